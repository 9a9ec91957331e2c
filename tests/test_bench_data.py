"""The bench's generated data sets (tools/): deterministic, class folders, disjoint train/val pixels."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import random  # noqa: E402

from make_photo_crops import SOURCES, STRIPS, crop_boxes, write_photo_crops  # noqa: E402
from make_shapes import SHAPES, draw_shape, write_shapes  # noqa: E402

BANDS, SIDES = SOURCES["sklearn"]


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
            for left, top, right, bottom in crop_boxes(width, height, band, len(BANDS), SIDES, split, 200, rng):
                assert top // strip == (bottom - 1) // strip and (top // strip) % 2 == parity  # one strip of its parity
                assert band * width // 3 <= left < right <= (band + 1) * width // 3  # inside its class's third


def test_fewer_strips_allow_larger_crops_still_split_by_parity():
    rng = random.Random(0)
    width, height, strips = 640, 427, 3
    strip = height // strips
    boxes = list(crop_boxes(width, height, 1, len(BANDS), (96, 192), "val", 100, rng, strips))
    assert max(right - left for left, _, right, _ in boxes) > 128  # 128 px crops need not be upsampled
    for left, top, right, bottom in boxes:
        assert right - left <= strip and top // strip == (bottom - 1) // strip == 1


def test_too_few_strips_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        write_photo_crops(tmp_path / "x", size=16, strips=1)


def test_skimage_crops_are_one_class_per_photo(tmp_path):
    counts = write_photo_crops(tmp_path / "e", size=16, train_per_class=2, val_per_class=1, source="skimage")
    classes = sorted(p.name for p in (tmp_path / "e" / "train").iterdir())
    assert len(classes) == 8 and "astronaut" in classes and "motorcycle" in classes
    assert counts == {"train": 16, "val": 8}
    assert Image.open(tmp_path / "e" / "val" / "camera" / "0000.png").mode == "RGB"


def test_shapes_are_white_on_black_named_classes_and_deterministic(tmp_path):
    counts = write_shapes(tmp_path / "a", size=32, train_per_class=3, val_per_class=2, seed=0)
    assert counts == {"train": 24, "val": 16}
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == sorted(SHAPES)
    write_shapes(tmp_path / "b", size=32, train_per_class=3, val_per_class=2, seed=0)
    for path in (tmp_path / "a").rglob("*.png"):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "b" / path.relative_to(tmp_path / "a"))))
    train = {np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "a" / "train").rglob("*.png")}
    assert not train & {np.asarray(Image.open(p)).tobytes() for p in (tmp_path / "a" / "val").rglob("*.png")}
    for name in SHAPES:
        pixels = np.asarray(draw_shape(name, 32, random.Random(1)), dtype=np.float32) / 255
        assert pixels[0, 0] == 0 and 0.03 < pixels.mean() < 0.6  # a white shape on a black ground
        assert ((pixels > 0.9).mean() > 0.02) and ((pixels > 0.1) & (pixels < 0.9)).mean() < 0.2  # sharp edges


def test_ring_and_key_have_holes():
    from scipy import ndimage

    for name in ("ring", "key"):
        pixels = np.asarray(draw_shape(name, 64, random.Random(2))) < 128  # background
        _, regions = ndimage.label(pixels)
        assert regions >= 2, name  # the outside and at least one hole
