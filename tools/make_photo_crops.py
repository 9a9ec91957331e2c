"""Write random crops of scikit-learn's two bundled photos as a 6-class image folder: OUT/{train,val}/CLASS/*.png.

Usage: python tools/make_photo_crops.py OUT [--size 32] [--train-per-class 200] [--val-per-class 50] [--seed 0]

A second, visibly different bench set next to the digits: colour natural texture (a pagoda, trees,
water, sky; a dahlia on a dark leafy background). Class = photo x vertical third (china_left,
china_centre, ..., flower_right). Each third is cut into 6 horizontal strips; train crops come from
the even strips and val crops from the odd ones, so no val pixel was ever seen in training.
Crops are squares of a random side in [24, 64] px, resized (bicubic) to SIZE. Deterministic under --seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

BANDS = ("left", "centre", "right")
STRIPS = 6
CROP_SIDES = (24, 64)


def crop_boxes(width: int, height: int, band_index: int, split: str, count: int, rng: random.Random):
    """`count` square (left, top, right, bottom) boxes inside vertical third `band_index` of a
    width x height photo, each wholly inside one strip of the split's parity (train even, val odd)."""
    left, right = band_index * width // len(BANDS), (band_index + 1) * width // len(BANDS)
    strip_height = height // STRIPS
    strips = [s for s in range(STRIPS) if s % 2 == (0 if split == "train" else 1)]
    for _ in range(count):
        strip = rng.choice(strips)
        side = rng.randint(*CROP_SIDES)
        x = rng.randint(left, right - side)
        y = rng.randint(strip * strip_height, (strip + 1) * strip_height - side)
        yield x, y, x + side, y + side


def write_photo_crops(out: Path, size: int = 32, train_per_class: int = 200, val_per_class: int = 50, seed: int = 0) -> dict[str, int]:
    """Write the folder; returns images written per split."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    for filename, pixels in zip(photos.filenames, photos.images):
        photo = Image.fromarray(np.asarray(pixels))
        name = Path(filename).stem
        for band_index, band in enumerate(BANDS):
            for split, count in (("train", train_per_class), ("val", val_per_class)):
                folder = out / split / f"{name}_{band}"
                folder.mkdir(parents=True, exist_ok=True)
                for index, box in enumerate(crop_boxes(*photo.size, band_index, split, count, rng)):
                    photo.resize((size, size), Image.BICUBIC, box=box).save(folder / f"{index:04d}.png")
                    counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_photo_crops(args.out, args.size, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")


if __name__ == "__main__":
    main()
