"""The training images: augmented crops addressed by (index, seed), and the sampler that schedules
them, so a resumed run or another number of workers sees the same batches."""

from __future__ import annotations

import logging
import random

import torch

from lqae.errors import DataError
from lqae.images.augment import augmented_crop, to_uint8_tensor
from lqae.images.files import ImageFolder, open_rgb, resize_center_crop

log = logging.getLogger(__name__)


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
