"""The training augmentation, fast: RandomResizedCrop + horizontal flip into uint8 tensors.

Two things make a loader worker faster than cropping and resizing with PIL and batching floats
(bench/loader.py measures it):
- a JPEG is decoded at a reduced DCT scale (PIL's `Image.draft`: 1/2, 1/4 or 1/8) when the crop is
  at least that many times the output size on both sides, so no detail the output keeps is lost;
- a crop that shrinks is resized by torch's uint8 bicubic kernel (antialiased, as PIL's), and
  batches stay uint8 until they reach the device (a quarter of float32's bytes to copy, pin and
  send). A crop that is enlarged goes through PIL: torch can only clamp at the crop's edges, where
  PIL's filter reads the pixels beyond them, so small images (the digits) train on exactly the
  pixels PIL gives.
The crop is a pure function of (image, rng): workers, resumes and shards agree.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lqae.images.files import open_rgb, resize_center_crop

DRAFT_FACTORS = (8, 4, 2)  # JPEG DCT scales PIL can decode at, largest first


def random_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int] | None:
    """(left, top, w, h) of an Inception-style random crop, drawn as torchvision draws it; None after
    10 misses (the caller falls back to the evaluation crop, as torchvision does)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    return None


def draft_factor(crop_w: int, crop_h: int, size: int) -> int:
    """The largest JPEG DCT reduction that keeps the crop at least `size` pixels on both sides (1: none)."""
    return next((f for f in DRAFT_FACTORS if min(crop_w, crop_h) >= f * size), 1)


def augmented_crop(
    path: str | Path, size: int, rng: random.Random, scale=(0.2, 1.0), hflip: bool = True
) -> torch.Tensor:
    """A random resized crop (bicubic) of the image at `path`, flipped with probability 1/2:
    (3, size, size) uint8. Raises DataError for an unreadable file."""
    plan: dict = {}

    def draft(stored: tuple[int, int]) -> tuple[int, int] | None:
        """Called with the stored size before decoding: draw the crop, ask for the reduced decode."""
        plan["stored"], plan["box"] = stored, random_crop_box(*stored, rng, scale)
        if plan["box"] is None:
            return None
        factor = draft_factor(plan["box"][2], plan["box"][3], size)
        return (math.ceil(stored[0] / factor), math.ceil(stored[1] / factor)) if factor > 1 else None

    image = open_rgb(path, draft=draft)
    out = _resized_crop(image, plan, size)  # (3, size, size) uint8
    if hflip and rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def _resized_crop(image, plan: dict, size: int) -> torch.Tensor:
    if plan["box"] is None:  # no crop drawn: the evaluation crop, as torchvision falls back
        return to_uint8_tensor(resize_center_crop(image, size))
    left, top, w, h = _box_in(image.size, plan)
    if w < size or h < size:  # enlarged: PIL's filter reads past the crop's edges, as it always did
        return to_uint8_tensor(image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
    pixels = np.asarray(image)[top : top + h, left : left + w]  # (h, w, 3) uint8, a view
    crop = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last memory
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def _box_in(decoded: tuple[int, int], plan: dict) -> tuple[int, int, int, int]:
    """The planned crop in the decoded image's pixels: scaled by the draft reduction, and transposed
    when opening turned the image a quarter (EXIF orientation): a transposed uniform crop is as
    random as the planned one."""
    (stored_w, stored_h), (left, top, w, h) = plan["stored"], plan["box"]
    width, height = decoded
    if stored_w != stored_h and (width > height) != (stored_w > stored_h):
        stored_w, stored_h, left, top, w, h = stored_h, stored_w, top, left, h, w
    sx, sy = width / stored_w, height / stored_h
    x0, y0 = min(width - 1, round(left * sx)), min(height - 1, round(top * sy))
    return x0, y0, max(1, min(width - x0, round(w * sx))), max(1, min(height - y0, round(h * sy)))


def to_uint8_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], as `lqae.images.files.to_tensor` gives them (the same values)."""
    return images.float().div_(255)
