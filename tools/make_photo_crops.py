"""Write random crops of bundled photos as an image folder: OUT/{train,val}/CLASS/*.png.

Usage: python tools/make_photo_crops.py OUT [--source sklearn|skimage] [--size 32]
                                            [--train-per-class 200] [--val-per-class 50] [--seed 0]
                                            [--strips 6] [--sides MIN,MAX]

`sklearn` (the `photos` bench set): scikit-learn's two sample photos, colour natural texture (a
pagoda, trees, water, sky; a dahlia on a dark leafy background); class = photo x vertical third
(china_left, china_centre, ..., flower_right), 6 classes, crops of 24-64 px.
`skimage` (the `edges` bench set): eight of scikit-image's bundled photos with sharp edges and
fine detail (astronaut, camera, cat, coffee, rocket, coins, clock, motorcycle); class = photo,
crops of 32-96 px. Each photo (or third) is cut into 6 horizontal strips (--strips); train crops come
from the even strips and val crops from the odd ones, so no val pixel was ever seen in training.
Crops are squares (--sides overrides the source's side range; a side never exceeds a strip) resized
(bicubic) to SIZE. Deterministic under --seed. For 128 px sets with few upsampled crops:
`--size 128 --strips 3 --sides 96,192`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

STRIPS = 6
SOURCES = {  # name: (vertical bands per photo, crop side range in source pixels)
    "sklearn": (("left", "centre", "right"), (24, 64)),
    "skimage": (("",), (32, 96)),
}
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "coffee", "rocket", "coins", "clock", "stereo_motorcycle")


def crop_boxes(width: int, height: int, band_index: int, bands: int, sides: tuple[int, int], split: str,
               count: int, rng: random.Random, strips: int = STRIPS):
    """`count` square (left, top, right, bottom) boxes inside vertical band `band_index` of `bands`
    of a width x height photo, each wholly inside one strip of the split's parity (train even, val odd)."""
    left, right = band_index * width // bands, (band_index + 1) * width // bands
    strip_height = height // strips
    chosen = [s for s in range(strips) if s % 2 == (0 if split == "train" else 1)]
    for _ in range(count):
        strip = rng.choice(chosen)
        side = min(rng.randint(*sides), strip_height, right - left)
        x = rng.randint(left, right - side)
        y = rng.randint(strip * strip_height, (strip + 1) * strip_height - side)
        yield x, y, x + side, y + side


def load_photos(source: str) -> list[tuple[str, Image.Image]]:
    """(name, RGB photo) pairs of a source."""
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        photos = load_sample_images()
        return [(Path(f).stem, Image.fromarray(np.asarray(p))) for f, p in zip(photos.filenames, photos.images)]
    import skimage.data

    pairs = []
    for name in SKIMAGE_PHOTOS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo pairs: the left view
        pairs.append((name.removeprefix("stereo_"), Image.fromarray(np.asarray(pixels)).convert("RGB")))
    return pairs


def write_photo_crops(out: Path, size: int = 32, train_per_class: int = 200, val_per_class: int = 50, seed: int = 0,
                      source: str = "sklearn", strips: int = STRIPS,
                      sides: tuple[int, int] | None = None) -> dict[str, int]:
    """Write the folder; returns images written per split."""
    if strips < 2:
        raise ValueError("--strips must be at least 2: train and val need a strip each")
    bands, source_sides = SOURCES[source]
    sides = sides or source_sides
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0}
    for name, photo in load_photos(source):
        for band_index, band in enumerate(bands):
            for split, count in (("train", train_per_class), ("val", val_per_class)):
                folder = out / split / (f"{name}_{band}" if band else name)
                folder.mkdir(parents=True, exist_ok=True)
                boxes = crop_boxes(*photo.size, band_index, len(bands), sides, split, count, rng, strips)
                for index, box in enumerate(boxes):
                    photo.resize((size, size), Image.BICUBIC, box=box).save(folder / f"{index:04d}.png")
                    counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", choices=sorted(SOURCES), default="sklearn")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strips", type=int, default=STRIPS, help="horizontal strips, alternately train and val")
    parser.add_argument("--sides", type=lambda text: tuple(int(v) for v in text.split(",")), default=None,
                        help="crop side range MIN,MAX in source pixels (default: the source's)")
    args = parser.parse_args()
    counts = write_photo_crops(args.out, args.size, args.train_per_class, args.val_per_class, args.seed, args.source,
                               args.strips, args.sides)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")


if __name__ == "__main__":
    main()
