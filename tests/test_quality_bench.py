"""bench/quality.py's per-set report runs end to end on a tiny model and carries every row it promises."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import tiny_model_config, tiny_train_config, write_class_images
from lqae.presets import Preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402

CLASSES = ("red", "blue", "green", "gray", "amber")


def test_a_data_set_report_has_the_probe_rows_and_the_overlap_accuracy(tiny_lm_dir, tmp_path, single_thread):
    folder = tmp_path / "set"
    write_class_images(folder / "train", CLASSES, per_class=4, size=16)
    write_class_images(folder / "val", CLASSES, per_class=2, size=16, seed=1)
    recipe = Preset(tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    report = quality.run_dataset("set", folder, tmp_path / "run", recipe, episodes=3)
    for row in ("probe_top1", "encoder_top1", "pixels_top1", "random_encoder_top1",
                "overlap_2way_1shot", "overlap_5way_1shot"):
        assert 0.0 <= report[row] <= 1.0, row
    assert report["val_images"] == 10 and report["train_images"] == 20
    assert Path(report["grid"]).is_file()
