"""Reading image files and folders: bit depths, transparency, symlinked folders, oversized files."""

import logging

import numpy as np
import pytest
from PIL import Image

from lqae.images.batches import image_batches
from lqae.images.files import open_rgb, scan_image_folder
from lqae.images.source import collect_images
from lqae.errors import DataError


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = (np.arange(16, dtype=np.uint32).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(open_rgb(path))
    assert pixels.shape == (4, 4, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1
    assert len(np.unique(pixels[..., 0])) == 16  # a ramp, not black-and-white


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent: the background
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: grey
    rgba[1, 1] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(open_rgb(tmp_path / "alpha.png")).astype(int)
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert np.abs(pixels[1, 0] - 127).max() <= 1
    assert pixels[1, 1].tolist() == [0, 0, 255]
    Image.fromarray(rgba[..., 3], "L").convert("LA").save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").mode == "RGB"


def _image(path, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (10, 200, 30)).save(path)


def test_symlinked_class_folders_are_followed_without_looping(tmp_path):
    store = tmp_path / "store"
    _image(store / "cats" / "a.png")
    _image(store / "dogs" / "b.png")
    data = tmp_path / "data"
    data.mkdir()
    (data / "cats").symlink_to(store / "cats", target_is_directory=True)
    (data / "dogs").symlink_to(store / "dogs", target_is_directory=True)
    (store / "cats" / "loop").symlink_to(data, target_is_directory=True)  # a link back up the tree
    folder = scan_image_folder(data)
    assert folder.classes == ["cats", "dogs"]
    assert [p.name for p in folder.paths] == ["a.png", "b.png"]


def test_an_oversized_image_is_skipped_and_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this
    _image(tmp_path / "data" / "small.png", size=8)
    _image(tmp_path / "data" / "huge.png", size=32)
    with caplog.at_level(logging.WARNING):
        folder = scan_image_folder(tmp_path / "data")
    assert [p.name for p in folder.paths] == ["small.png"]
    assert "huge.png" in caplog.text
    with pytest.raises(DataError, match="huge.png"):
        open_rgb(tmp_path / "data" / "huge.png")


def test_every_unreadable_file_is_named_up_to_five(tmp_path, caplog):
    _image(tmp_path / "data" / "good.png")
    for i in range(7):
        (tmp_path / "data" / f"bad{i}.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        scan_image_folder(tmp_path / "data")
    assert "skipped 7 unreadable" in caplog.text and "bad4.png" in caplog.text and "and 2 more" in caplog.text


def test_collect_images_expands_folders_in_order_and_refuses_bad_named_files(tmp_path):
    for name in ("b/2.png", "b/1.png", "a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / name)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    paths = collect_images([tmp_path / "a.png", tmp_path / "b"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "b/1.png", "b/2.png"]  # broken skipped
    with pytest.raises(DataError, match="does not exist"):
        collect_images([tmp_path / "missing.png"])
    with pytest.raises(DataError, match="corrupt"):
        collect_images([tmp_path / "b" / "broken.png"])
    with pytest.raises(DataError, match="no images given"):
        collect_images([])
    batches = list(image_batches(paths, 4, batch_size=2))
    assert [len(chunk) for chunk, _ in batches] == [2, 1]
    assert batches[0][1].shape == (2, 3, 4, 4) and batches[1][0] == paths[2:]
