"""Images in batches with the evaluation transform, in order: decoded in this process
(`image_batches`), or in worker processes while the model runs (`eval_batches`).

Workers send uint8 pixels (a quarter of float32's bytes) and the floats are made on the device, with
the values `lqae.images.files.load_image` gives: the ids are the same as without workers. A file
that turns unreadable is reported as one DataError in the main process, not as a worker's traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lqae.errors import DataError
from lqae.images.augment import to_float, to_uint8_tensor
from lqae.images.files import load_image, name_some, open_rgb, resize_center_crop

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4


def image_batches(
    paths: Sequence[Path], size: int, batch_size: int = 64, device: torch.device | str = "cpu",
    skip_unreadable: bool | Callable[[Path], bool] = False,
) -> Iterator[tuple[Sequence[Path], torch.Tensor]]:
    """(paths, images (b, 3, size, size) on `device`) per batch, in order, with the evaluation
    transform; memory holds one batch of pixels.

    An image that cannot be decoded raises DataError, unless `skip_unreadable` is True (or True
    for its path): then it is left out of its batch and named in a warning, and the yielded paths
    are those of the images in the tensor. A folder scan reads headers only, so this is where a
    truncated file is found."""
    for start in range(0, len(paths), batch_size):
        chunk, images, skipped = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path, size))
                chunk.append(path)
            except DataError as exc:
                if not (skip_unreadable(path) if callable(skip_unreadable) else skip_unreadable):
                    raise
                skipped.append(path)
                reason = exc
        if skipped:
            log_skipped(skipped, reason)
        if chunk:
            yield chunk, torch.stack(images).to(device)


def log_skipped(skipped: Sequence, reason) -> None:
    """One warning naming (up to five of) the images left out of a batch because they would not decode."""
    log.warning("skipped %d unreadable image(s): %s (%s)", len(skipped), name_some(skipped), reason)


def auto_workers(images: int, batch_size: int) -> int:
    """Workers worth starting for `images` images: none for a single batch (start-up would cost more
    than it saves), else one per spare core, up to MAX_AUTO_WORKERS."""
    if images <= batch_size:
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) - 1))


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        try:
            return to_uint8_tensor(resize_center_crop(open_rgb(self.paths[index]), self.size))  # (3, S, S)
        except DataError as exc:
            return str(exc)


def _stack_or_errors(items: list) -> tuple[torch.Tensor | None, dict[int, str]]:
    """(the decoded images stacked (b', 3, S, S) uint8 or None, {position in the batch: error})."""
    errors = {i: item for i, item in enumerate(items) if isinstance(item, str)}
    images = [item for item in items if not isinstance(item, str)]
    return (torch.stack(images) if images else None), errors


def eval_batches(
    paths: Sequence[Path], size: int, batch_size: int, device: torch.device | str, workers: int,
    skip_unreadable: bool | Callable[[Path], bool] = False,
) -> Iterator[tuple[Sequence[Path], torch.Tensor]]:
    """(paths, images (b, 3, size, size) in [0, 1] on `device`) per batch, in order, like
    `image_batches` (`skip_unreadable` as there), decoded by `workers` processes (pinned
    memory on CUDA). On CPU the model's threads leave the workers their cores meanwhile (spinning
    threads on a busy core cost more than they compute)."""
    on_cuda = str(device).startswith("cuda")
    loader = torch.utils.data.DataLoader(
        _EvalImages(paths, size), batch_size=batch_size, num_workers=workers, collate_fn=_stack_or_errors,
        pin_memory=on_cuda,
    )
    threads = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        for start, (batch, errors) in zip(range(0, len(paths), batch_size), loader):
            chunk = paths[start : start + batch_size]
            for position, error in errors.items():
                path = chunk[position]
                if not (skip_unreadable(path) if callable(skip_unreadable) else skip_unreadable):
                    raise DataError(error)
            if errors:
                log_skipped([chunk[i] for i in errors], next(iter(errors.values())))
            if batch is not None:
                kept = [path for i, path in enumerate(chunk) if i not in errors]
                yield kept, to_float(batch.to(device, non_blocking=True))
    finally:
        torch.set_num_threads(threads)
