"""The image streams: the images a user names, evaluation batches, and the augmented training set
and its sampler. Reading one image file or folder is `lqae.imagefiles` (its names are importable
from here too)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lqae.augment import augmented_crop, to_uint8_tensor
from lqae.errors import DataError
from lqae.imagefiles import (  # the names `lqae.data` had before imagefiles was split out of it
    IMAGE_EXTENSIONS, ImageFolder, image_problem, is_readable_image, load_image, name_some, open_rgb,
    resize_center_crop, scan_image_folder, to_pil, to_tensor, warn_skipped,
)
from lqae.shards import is_shard_source, scan_shards

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS", "EpochBatchSampler", "ImageFolder", "TrainDataset", "collect_images", "found_in_folders",
    "image_batches", "image_problem", "is_readable_image", "load_image", "log_skipped", "name_some", "open_rgb",
    "resize_center_crop", "scan_image_folder", "to_pil", "to_tensor", "warn_skipped",
]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by a user, folders expanded recursively (sorted), in input order.

    A named file that is missing or unreadable raises DataError before any work; unreadable files
    inside a folder are skipped with a warning, as `lqae train` does."""
    if not inputs:
        raise DataError("no images given: pass image files or folders")
    paths: list[Path] = []
    for item in map(Path, inputs):
        if is_shard_source(item):  # tar shards: their images, in stored order
            paths.extend(scan_shards(item).paths)
        elif item.is_dir():
            paths.extend(scan_image_folder(item).paths)
        elif not item.exists():
            raise DataError(f"image {item} does not exist")
        else:
            problem = image_problem(item)
            if problem:
                raise DataError(f"cannot read image {item}: {problem}")
            paths.append(item)
    return paths


def log_skipped(skipped: Sequence, reason) -> None:
    """One warning naming (up to five of) the images left out of a batch because they would not decode."""
    log.warning("skipped %d unreadable image(s): %s (%s)", len(skipped), name_some(skipped), reason)


def found_in_folders(inputs: Sequence[str | Path]) -> Callable[[Path], bool]:
    """For `image_batches`' skip_unreadable: True for images `collect_images` found inside the
    folders among `inputs` (skipped when unreadable), False for files named one by one (an error)."""
    named = {Path(item) for item in inputs if not Path(item).is_dir()}
    return lambda path: Path(path) not in named


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


class TrainDataset(torch.utils.data.Dataset):
    """Augmented training images. Items are addressed by (index, seed) so augmentation is a pure
    function of the sample schedule: resuming or changing worker counts gives the same batches."""

    def __init__(self, folder: ImageFolder, size: int, crop_scale_min: float = 0.2, hflip: bool = True,
                 augment: bool = True, views: int = 1):
        """`views` > 1: each item is (views, 3, size, size), independent augmentations of one image
        (the first is the one a single view would get), for the global tokens' self-distillation."""
        self.folder, self.size = folder, size
        self.crop_scale, self.hflip, self.augment, self.views = (crop_scale_min, 1.0), hflip, augment, views

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        """(3, size, size) uint8, or (views, 3, size, size); the training loop makes floats of it on the device."""
        index, seed = item
        rng = random.Random(seed)
        for _ in range(len(self.folder)):
            try:
                path = self.folder.paths[index]
                if not self.augment:
                    return to_uint8_tensor(resize_center_crop(open_rgb(path), self.size))
                crops = [augmented_crop(path, self.size, rng, self.crop_scale, self.hflip) for _ in range(self.views)]
                return crops[0] if self.views == 1 else torch.stack(crops)
            except DataError as exc:  # unreadable since the scan: warn, use another image
                log.warning("%s; using another image", exc)
                index = rng.randrange(len(self.folder))
        raise DataError(f"no readable image left in {self.folder.root}")


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields, from a given step on, the (index, seed) lists of this rank's share of each global batch.

    Epoch e is a permutation drawn from (seed, e); a partial last batch is dropped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        if batch_size * world > size:
            raise DataError(f"{size} images cannot fill one batch of {batch_size * world}; lower --batch-size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.batches_per_epoch = size // (batch_size * world)

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            for batch in range(position, self.batches_per_epoch):
                start = (batch * self.world + self.rank) * self.batch_size
                yield [(i, ((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i) % 2**31) for i in order[start : start + self.batch_size]]
            step = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # infinite; DataLoader needs a number
        return 2**31 - 1
