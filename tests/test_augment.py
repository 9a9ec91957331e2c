"""The training augmentation: a pure function of (image, seed) whatever the worker count, JPEG
draft decoding only where the crop keeps every output pixel's detail, close to PIL's bicubic."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lqae.images.augment import _box_in, augmented_crop, draft_factor, random_crop_box
from lqae.images.files import open_rgb, scan_image_folder
from lqae.training.data import EpochBatchSampler, TrainDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from loader import BeforeDataset  # noqa: E402 (the previous augmentation, kept in the loader bench)


@pytest.fixture
def photo(tmp_path):
    ys, xs = np.mgrid[0:300, 0:400]
    pixels = np.stack([128 + 100 * np.sin(xs / 23), 128 + 100 * np.cos(ys / 17), (xs + ys) % 256], -1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
    return path


def test_draft_factor_keeps_the_crop_at_least_the_output_size():
    assert draft_factor(300, 260, 32) == 8 and draft_factor(300, 200, 32) == 4 and draft_factor(70, 90, 32) == 2
    assert draft_factor(63, 400, 32) == 1 and draft_factor(375, 500, 256) == 1  # ImageNet-size at 256 px: no draft


def test_open_rgb_decodes_a_jpeg_at_the_reduced_scale_asked_for(photo, tmp_path):
    seen = []
    image = open_rgb(photo, draft=lambda size: seen.append(size) or (100, 75))
    assert seen == [(400, 300)] and image.size == (100, 75) and image.mode == "RGB"
    png = tmp_path / "photo.png"
    Image.open(photo).save(png)
    assert open_rgb(png, draft=lambda size: (100, 75)).size == (400, 300)  # only JPEGs decode reduced


def test_crops_are_a_function_of_the_seed_and_close_to_pils_bicubic(photo):
    a, b = augmented_crop(photo, 32, random.Random(7)), augmented_crop(photo, 32, random.Random(7))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, augmented_crop(photo, 32, random.Random(8)))
    # the same crop through PIL from the full-size decode (the box as the reduced decode's pixels
    # place it): the reduced decode and torch's resize lose nothing visible
    rng = random.Random(7)
    box = random_crop_box(400, 300, rng)
    flip = rng.random() < 0.5
    factor = draft_factor(box[2], box[3], 32)
    reduced = open_rgb(photo, draft=lambda size: (-(-size[0] // factor), -(-size[1] // factor))).size
    x, y, w, h = _box_in(reduced, {"stored": (400, 300), "box": box})
    sx, sy = reduced[0] / 400, reduced[1] / 300
    reference = Image.open(photo).convert("RGB").resize((32, 32), Image.BICUBIC, box=(x / sx, y / sy, (x + w) / sx, (y + h) / sy))
    if flip:
        reference = reference.transpose(Image.FLIP_LEFT_RIGHT)
    difference = np.abs(a.permute(1, 2, 0).numpy().astype(int) - np.asarray(reference).astype(int))
    assert factor > 1 and reduced[0] < 400 and difference.mean() < 2


def test_a_planned_box_follows_a_reduced_or_turned_decode():
    plan = {"stored": (400, 300), "box": (100, 50, 200, 160)}
    assert _box_in((100, 75), plan) == (25, 12, 50, 40)  # 1/4 scale
    assert _box_in((300, 400), plan) == (50, 100, 160, 200)  # EXIF-turned: the box turns too
    left, top, w, h = _box_in((75, 100), {"stored": (400, 300), "box": (399, 299, 1, 1)})
    assert 0 <= left < 75 and 0 <= top < 100 and w >= 1 and h >= 1


def test_training_batches_are_the_same_with_and_without_workers(image_folder):
    dataset = TrainDataset(scan_image_folder(image_folder), 16)

    def batches(workers):
        sampler = EpochBatchSampler(len(dataset), 4, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        stream = iter(loader)
        return [next(stream) for _ in range(4)]

    plain, parallel = batches(0), batches(2)
    assert plain[0].dtype == torch.uint8 and plain[0].shape == (4, 3, 16, 16)
    assert all(torch.equal(x, y) for x, y in zip(plain, parallel))


def test_enlarged_crops_are_the_pixels_the_previous_augmentation_gave(image_folder):
    """Images smaller than the output (the digits) train on exactly the crops they did before."""
    folder = scan_image_folder(image_folder)  # 20 to 28 px images
    now, before = TrainDataset(folder, 32), BeforeDataset(folder, 32)
    for item in [(i, 1000 + i) for i in range(len(folder))]:
        assert torch.equal(now[item].float().div(255), before[item])
