"""Write generated silhouettes of named shape classes as an image folder: OUT/{train,val}/CLASS/*.png.

Usage: python tools/make_shapes.py OUT [--size 32] [--train-per-class 250] [--val-per-class 50] [--seed 0]

A bench set with what the digits and photo crops lack: sharp, high-contrast edges, thin parts and
holes. White shapes on black, drawn at 4x the output size and reduced with a box filter (so edges
are anti-aliased but sharp). Eight classes: star, crescent, cross, ring (a hole), arrow, key (a hole
and a thin shaft), quadruped (a body on four thin legs, a neck and a head) and bird (thin wings).
Every image has its own pose: rotation, scale, aspect, position, and per-class proportions (number
of star points, leg length, ring width, ...). Train and val are drawn from disjoint seeds, so no
val image repeats a train image. Deterministic under --seed.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SUPERSAMPLE = 4
Point = tuple[float, float]


def _star(rng: random.Random) -> list[list[Point]]:
    points, inner = rng.randint(5, 7), rng.uniform(0.35, 0.55)
    return [[_polar(1.0 if i % 2 == 0 else inner, math.pi * i / points) for i in range(2 * points)]]


def _crescent(rng: random.Random) -> list[list[Point]]:
    # a disc, then an offset disc cut out of it (HOLES)
    offset, inner = rng.uniform(0.3, 0.55), rng.uniform(0.75, 0.95)
    return [[_polar(1.0, t) for t in _range(0, 2 * math.pi, 64)],
            [(offset + inner * math.cos(t), inner * math.sin(t)) for t in _range(0, 2 * math.pi, 64)]]


def _cross(rng: random.Random) -> list[list[Point]]:
    arm = rng.uniform(0.18, 0.35)
    a, b = arm, 1.0
    return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]]


def _ring(rng: random.Random) -> list[list[Point]]:
    hole = rng.uniform(0.45, 0.7)
    return [[_polar(1.0, t) for t in _range(0, 2 * math.pi, 48)], [_polar(hole, t) for t in _range(0, 2 * math.pi, 48)]]


def _arrow(rng: random.Random) -> list[list[Point]]:
    shaft, head = rng.uniform(0.08, 0.18), rng.uniform(0.35, 0.55)
    neck = rng.uniform(0.1, 0.4)
    return [[(-1.0, -shaft), (neck, -shaft), (neck, -head), (1.0, 0.0), (neck, head), (neck, shaft), (-1.0, shaft)]]


def _key(rng: random.Random) -> list[list[Point]]:
    bow, shaft = rng.uniform(0.3, 0.42), rng.uniform(0.06, 0.12)
    centre = -1.0 + bow
    ring = [(centre + bow * math.cos(t), bow * math.sin(t)) for t in _range(0, 2 * math.pi, 40)]
    hole = [(centre + 0.5 * bow * math.cos(t), 0.5 * bow * math.sin(t)) for t in _range(0, 2 * math.pi, 32)]
    tooth = rng.uniform(0.15, 0.3)
    blade = [(centre + bow * 0.8, -shaft), (1.0, -shaft), (1.0, shaft + tooth), (0.8, shaft + tooth),
             (0.8, shaft), (0.6, shaft), (0.6, shaft + tooth * 0.7), (0.45, shaft + tooth * 0.7),
             (0.45, shaft), (centre + bow * 0.8, shaft)]
    return [ring, hole, blade]


def _quadruped(rng: random.Random) -> list[list[Point]]:
    length, height = rng.uniform(0.55, 0.75), rng.uniform(0.2, 0.3)
    leg, thick = rng.uniform(0.35, 0.6), rng.uniform(0.05, 0.09)
    body = [(length * math.cos(t), -0.1 + height * math.sin(t)) for t in _range(0, 2 * math.pi, 40)]
    parts = [body]
    for x in (-length * 0.75, -length * 0.5, length * 0.5, length * 0.75):
        parts.append([(x - thick, 0.0), (x + thick, 0.0), (x + thick, leg), (x - thick, leg)])
    neck_x = length * 0.85
    parts.append([(neck_x - thick, -0.1), (neck_x + thick * 1.5, -0.1), (neck_x + 0.25, -0.55), (neck_x + 0.12, -0.6)])
    head_r = rng.uniform(0.1, 0.15)
    parts.append([(neck_x + 0.22 + head_r * 1.4 * math.cos(t), -0.62 + head_r * math.sin(t)) for t in _range(0, 2 * math.pi, 24)])
    tail = rng.uniform(0.2, 0.35)
    parts.append([(-length, -0.15), (-length - tail, -0.35), (-length - tail + 0.05, -0.4), (-length + 0.05, -0.2)])
    return parts


def _bird(rng: random.Random) -> list[list[Point]]:
    span, sweep, thick = rng.uniform(0.8, 1.0), rng.uniform(0.1, 0.5), rng.uniform(0.06, 0.12)
    body = [(0.35 * math.cos(t), 0.12 * math.sin(t)) for t in _range(0, 2 * math.pi, 32)]
    parts = [body]
    for side in (-1, 1):
        parts.append([(0.05, 0.0), (-0.1, side * 0.02), (-sweep, side * span), (-sweep + thick * 2, side * span),
                      (0.15, side * 0.05)])
    parts.append([(-0.3, -0.05), (-0.6, -0.15), (-0.6, 0.15), (-0.3, 0.05)])  # tail
    return parts


SHAPES = {
    "star": _star, "crescent": _crescent, "cross": _cross, "ring": _ring,
    "arrow": _arrow, "key": _key, "quadruped": _quadruped, "bird": _bird,
}
HOLES = {"crescent": (1,), "ring": (1,), "key": (1,)}  # polygon indices drawn in black (cut out)


def _polar(radius: float, angle: float) -> Point:
    return radius * math.cos(angle), radius * math.sin(angle)


def _range(start: float, stop: float, count: int) -> list[float]:
    return [start + (stop - start) * i / count for i in range(count)]


def draw_shape(name: str, size: int, rng: random.Random) -> Image.Image:
    """One white-on-black silhouette of class `name` in a random pose, `size` x `size`, greyscale."""
    big = size * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    canvas = ImageDraw.Draw(image)
    angle = rng.uniform(0, 2 * math.pi)
    scale = big * rng.uniform(0.28, 0.46)
    aspect = rng.uniform(0.75, 1.3)
    flip = rng.choice((-1, 1))
    centre_x = big / 2 + rng.uniform(-0.1, 0.1) * big
    centre_y = big / 2 + rng.uniform(-0.1, 0.1) * big
    cos, sin = math.cos(angle), math.sin(angle)

    def place(point: Point) -> Point:
        x, y = point[0] * aspect * flip, point[1] / aspect
        return centre_x + scale * (x * cos - y * sin), centre_y + scale * (x * sin + y * cos)

    for index, polygon in enumerate(SHAPES[name](rng)):
        fill = 0 if index in HOLES.get(name, ()) else 255
        canvas.polygon([place(p) for p in polygon], fill=fill)
    return image.reduce(SUPERSAMPLE)


def write_shapes(out: Path, size: int = 32, train_per_class: int = 250, val_per_class: int = 50, seed: int = 0) -> dict[str, int]:
    """Write the folder; returns images written per split."""
    counts = {"train": 0, "val": 0}
    for class_index, name in enumerate(SHAPES):
        for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            rng = random.Random((seed * 1009 + class_index) * 2 + split_index)
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_shape(name, size, rng).save(folder / f"{index:04d}.png")
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=250)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_shapes(args.out, args.size, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")


if __name__ == "__main__":
    main()
