"""Image folders encoded into token datasets: in memory (`encode_folder`) or streamed straight into
the file, by one process or by each torchrun rank into its shard (`encode_folder_to_file`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lqae.codec import encode_images
from lqae.config import to_dict
from lqae import distributed
from lqae.errors import DataError
from lqae.tokendata.format import (
    TokenDataset, TokenDatasetWriter, check_overwritable, dataset_metadata, rows_in, shard_path, write_token_index,
)


def encode_folder(
    model,
    folder,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> TokenDataset:
    """Encode every readable image of an `ImageFolder` into an in-memory TokenDataset (one batch of
    pixels at a time); images that cannot be decoded are skipped and named in a warning."""
    rows, kept = [], []
    for chunk, ids in encode_images(model, folder.paths, batch_size, skip_unreadable=True):
        rows.append(ids)
        kept += chunk
        if progress:
            progress(len(chunk))
    if not kept:
        raise DataError(f"none of the {len(folder)} images in {folder.root} could be read")
    label_of = dict(zip(map(str, folder.paths), folder.labels))
    grid = model.config.layout.grid
    return TokenDataset(
        ids=torch.cat(rows).long(), labels=torch.tensor([label_of[str(p)] for p in kept], dtype=torch.long),
        classes=list(folder.classes), paths=[str(p) for p in kept], model_config=to_dict(model.config),
        grid=(grid, grid), weights=getattr(model, "weights_fingerprint", None),
    )


@dataclass
class TokenFileSummary:
    """What `encode_folder_to_file` wrote."""

    path: str
    images: int
    tokens_per_image: int
    classes: list[str]
    skipped: int  # unreadable files the folder scan left out
    id_dtype: str  # e.g. "int16"
    id_bytes: int  # size of the ids tensor
    pixel_bytes: int  # the same images as uint8 RGB at the model's resolution
    file_bytes: int  # the whole file: ids, labels, paths and config

    @property
    def compression(self) -> float:
        """How many times smaller the ids are than the pixels."""
        return self.pixel_bytes / max(1, self.id_bytes)


def encode_folder_to_file(
    model,
    folder,
    path: str | Path,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    timings=None,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> TokenFileSummary:
    """Encode an `ImageFolder` straight into a token dataset file, streaming: memory holds one
    batch of pixels and ids whatever the folder size (a few with `workers` decoding ahead). Images
    that cannot be decoded are left out (and named in a warning). Nothing is left at `path` on
    error, and a file at `path` that is not a token dataset is never replaced.

    With `world` > 1 (one call per torchrun process), rank `rank` encodes its contiguous share of
    the rows into `shard_path(path, rank, world)`; once every rank has succeeded, rank 0 writes the
    index at `path`. The summary is of the whole dataset (on rank 0; of its share on the others)."""
    config = model.config
    grid = (config.layout.grid, config.layout.grid)
    rows = distributed.rank_share(len(folder), rank, world)
    target = shard_path(path, rank, world) if world > 1 else Path(path)
    paths = [folder.paths[i] for i in rows]
    classes, model_config, weights = list(folder.classes), to_dict(config), getattr(model, "weights_fingerprint", None)
    if world > 1 and rank == 0:
        check_overwritable(Path(path))  # the index will go there
        Path(path).unlink(missing_ok=True)  # an older index: gone before any shard changes, written again last
    writer = TokenDatasetWriter(
        target, [folder.labels[i] for i in rows], config.num_tokens, classes, [str(p) for p in paths], model_config,
        grid, weights,
    )
    row_of = {str(p): i for i, p in enumerate(paths)}
    failure = None
    try:
        with writer:
            for chunk, ids in encode_images(model, paths, batch_size, timings, skip_unreadable=True, workers=workers):
                writer.write(ids, [row_of[str(p)] for p in chunk])
                if progress:
                    progress(len(chunk))
            if paths and writer.written == 0 and world == 1:
                raise DataError(f"none of the {len(folder)} images in {folder.root} could be read")
            writer.skip_unwritten()
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone goes on
        failure = exc
    if world > 1 and distributed.any_rank(failure is not None, str(model.device)) and failure is None:
        raise DataError(f"another encoding process failed; {path} was not written (its error says why)")
    if failure is not None:
        raise failure
    files, images = [target], writer.written
    if world > 1:
        files = [shard_path(path, r, world) for r in range(world)]
        if rank == 0:
            counts = [rows_in(f) for f in files]
            if not sum(counts):
                raise DataError(f"none of the {len(folder)} images in {folder.root} could be read")
            write_token_index(path, files, counts, dataset_metadata(classes, [], grid, model_config, weights))
            images = sum(counts)
        files.append(Path(path))
        distributed.any_rank(False, str(model.device))  # the index exists for every rank from here on
    itemsize = torch.tensor([], dtype=writer.dtype).element_size()
    return TokenFileSummary(
        path=str(path), images=images, tokens_per_image=config.num_tokens, classes=classes,
        skipped=len(folder.skipped) + (len(folder) if world > 1 and rank == 0 else len(paths)) - images,
        id_dtype=str(writer.dtype).replace("torch.", ""), id_bytes=images * config.num_tokens * itemsize,
        pixel_bytes=images * config.channels * config.image_size**2,
        file_bytes=sum(f.stat().st_size for f in files if f.is_file()),
    )


