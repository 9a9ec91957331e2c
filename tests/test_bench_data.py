"""The bench's generated data sets (tools/): deterministic, class folders, disjoint train/val pixels."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import random  # noqa: E402

from make_photo_crops import BANDS, STRIPS, crop_boxes, write_photo_crops  # noqa: E402


def test_photo_crops_are_deterministic_six_classes_and_split_by_strip(tmp_path):
    counts = write_photo_crops(tmp_path / "a", size=16, train_per_class=3, val_per_class=2, seed=1)
    assert counts == {"train": 18, "val": 12}
    classes = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert classes == sorted(f"{photo}_{band}" for photo in ("china", "flower") for band in BANDS)
    assert sorted(p.name for p in (tmp_path / "a" / "val").iterdir()) == classes
    image = Image.open(tmp_path / "a" / "train" / "flower_centre" / "0000.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    write_photo_crops(tmp_path / "b", size=16, train_per_class=3, val_per_class=2, seed=1)
    for path in (tmp_path / "a").rglob("*.png"):
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))


def test_train_and_val_crops_never_share_a_pixel_row_strip():
    rng = random.Random(0)
    width, height = 640, 427
    strip = height // STRIPS
    for band in range(len(BANDS)):
        for split, parity in (("train", 0), ("val", 1)):
            for left, top, right, bottom in crop_boxes(width, height, band, split, 200, rng):
                assert top // strip == (bottom - 1) // strip and (top // strip) % 2 == parity  # one strip of its parity
                assert band * width // 3 <= left < right <= (band + 1) * width // 3  # inside its class's third
