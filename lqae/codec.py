"""Image files -> token ids and token ids -> PNG files, in batches so memory stays bounded.

Used by `lqae encode` / `lqae decode`; the token dataset file format lives in `lqae.tokendata.format`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lqae.images.batches import image_batches
from lqae.errors import DataError, TokenError
from lqae.images.files import load_image
from lqae.images.output import check_png_output, save_png, token_picture
from lqae.images.batches import eval_batches


@dataclass
class EncodeTimings:
    """Where the time of an encode went (seconds)."""

    images: int = 0
    load_seconds: float = 0.0  # reading, decoding and resizing image files
    model_seconds: float = 0.0  # inside model.encode (the forward pass and nearest-code search)
    total_seconds: float = 0.0  # the whole loop, including the consumer of each batch (e.g. printing)

    def as_dict(self) -> dict:
        return {
            "images": self.images, "load_s": round(self.load_seconds, 4), "model_s": round(self.model_seconds, 4),
            "total_s": round(self.total_seconds, 4),
        }


@torch.inference_mode()
def encode_images(
    model,
    paths: Sequence[Path],
    batch_size: int = 64,
    timings: EncodeTimings | None = None,
    skip_unreadable: bool | Callable[[Path], bool] = False,
    workers: int = 0,
) -> Iterator[tuple[Sequence[Path], torch.Tensor]]:
    """Yield (paths, ids (b, L) long on CPU) per batch, in order. Memory holds one batch of pixels
    (with `workers`, a few: each worker process decodes batches ahead while the model runs).
    Images that cannot be decoded raise DataError, or are left out (and named in a warning) as
    `skip_unreadable` says (see `data.image_batches`); the yielded paths are those encoded.

    Images of any size are resized (shorter side) and centre-cropped to the model's resolution,
    as at evaluation. Deterministic: the same image and model give the same ids whatever the batch
    and however many workers.
    """
    model.eval()
    timings = timings if timings is not None else EncodeTimings()
    started = tick = time.perf_counter()
    size, device = model.config.image_size, model.device
    if workers > 0:
        batches = eval_batches(paths, size, batch_size, device, workers, skip_unreadable)
    else:
        batches = image_batches(paths, size, batch_size, device, skip_unreadable)
    for chunk, images in batches:  # (b, C, H, W)
        tock = time.perf_counter()
        ids = model.encode(images).cpu()  # (b, L)
        timings.load_seconds += tock - tick
        timings.model_seconds += time.perf_counter() - tock
        timings.images += len(chunk)
        yield chunk, ids
        timings.total_seconds = time.perf_counter() - started
        tick = time.perf_counter()
    timings.total_seconds = time.perf_counter() - started


def decode_to_pngs(
    model,
    ids: torch.Tensor,
    out_paths: Sequence[Path],
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode (N, L) ids and write each image, at the model's resolution, to its PNG (atomically).

    Every row is checked against the codebook, and every output path (an existing file is replaced
    only when it is a PNG), before the first file is written, so bad input leaves nothing behind.
    """
    if ids.ndim != 2 or ids.shape[0] != len(out_paths):
        raise ValueError(f"ids {tuple(ids.shape)} do not match {len(out_paths)} output paths")
    model.codebook.codes_from_token_ids(ids)  # raises TokenError for any id outside the codebook
    if ids.shape[1] != model.config.num_tokens:
        raise TokenError(f"got {ids.shape[1]} tokens per image, this model expects {model.config.num_tokens}")
    for path in out_paths:  # every output checked before the first is written
        check_png_output(path)
    model.eval()
    for start in range(0, ids.shape[0], batch_size):
        images = model.decode(ids[start : start + batch_size].to(model.device)).cpu()  # (b, C, H, W)
        for image, path in zip(images, out_paths[start : start + batch_size]):
            save_png(image, path)
        if progress:
            progress(images.shape[0])


def output_paths(out: Path, names: Sequence[str]) -> list[Path]:
    """Where decoded images go: `out` itself for one image, `out/NAME.png` for several.

    One image and `out` an existing folder: `out/NAME.png`. Several: `out` must be a folder (made
    when missing). Names must be distinct.
    """
    out = Path(out)
    if len(names) == 1 and not out.is_dir():
        if out.suffix.lower() != ".png":
            raise DataError(f"--out {out} must end in .png (or be a folder)")
        return [out]
    if out.exists() and not out.is_dir():
        raise DataError(f"{len(names)} images to write, but --out {out} is a file: give a folder")
    if len(set(names)) != len(names):
        raise ValueError("output names must be distinct")
    return [out / f"{name}.png" for name in names]


def image_name(index: int, source: str | None) -> str:
    """A stable file name for the index-th decoded image: `00007` or `00007_cat_012` (source stem)."""
    stem = Path(source).stem if source else ""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]
    return f"{index:05d}_{stem}" if stem else f"{index:05d}"


@torch.inference_mode()
def picture_tokens(model, path: Path, out: Path) -> list[int]:
    """Encode one image, decode its tokens, and write `images.token_picture` of it to `out` (the image
    beside its reconstruction, each patch's word over its patch, the global words above). Returns the ids."""
    model.eval()
    image = load_image(path, model.config.image_size)[None].to(model.device)  # (1, C, H, W)
    ids = model.encode(image)  # (1, L)
    reconstruction = model.decode(ids)
    tokens = [model.tokenizer.convert_ids_to_tokens(i) for i in ids[0].tolist()]
    words = [model.tokenizer.convert_tokens_to_string([t]).strip() or t for t in tokens]
    global_words, patch_words = model.config.layout.split(words)
    token_picture(image[0].cpu(), reconstruction[0].cpu(), patch_words, model.config.layout.grid, global_words, Path(out))
    return ids[0].tolist()
