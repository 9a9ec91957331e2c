"""Write scikit-learn's bundled 8x8 digits as an image folder: OUT/{train,val}/{zero,...,nine}/*.png.

Usage: python tools/make_digits.py OUT [--size 32] [--val-fraction 0.2]
Deterministic: the same split every time (stratified, every k-th image of a class goes to val).
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:
    import numpy as np
    from PIL import Image
except ImportError as exc:  # the system python: the project's environment has them
    raise SystemExit(f"{exc.name} is missing: run this with the project's environment, `.venv/bin/python "
                     "tools/make_digits.py OUT` (made by `make install`), or activate it first") from None

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32, help="output side in pixels (bicubic upscale)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args()
    counts = write_digits(args.out, args.size, args.val_fraction)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")


def write_digits(out: Path, size: int = 32, val_fraction: float = 0.2) -> dict[str, int]:
    """Write the folder; returns images written per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("scikit-learn is missing: run this with `.venv/bin/python` (made by `make install`)") from None

    digits = load_digits()
    every = max(2, round(1 / val_fraction))
    seen = {label: 0 for label in range(10)}
    counts = {"train": 0, "val": 0}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if seen[label] % every == every - 1 else "train"
        seen[label] += 1
        folder = out / split / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(np.uint8(pixels * (255 / 16)), mode="L")
        gray.resize((size, size), Image.BICUBIC).save(folder / f"{index:04d}.png")
        counts[split] += 1
    return counts


if __name__ == "__main__":
    main()
