"""`lqae train --tracker`: TensorBoard event files and an offline W&B run, read back."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import SMALL_GLOBAL_SETS
from typer.testing import CliRunner

from lqae_cli.app import app

COMMON = ["--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--quiet", "--workers", "0", *SMALL_GLOBAL_SETS, "--steps", "5",
          "--set", "log_every=1", "--set", "sample_every=5"]


def train_cli(image_folder, run, tiny_lm_dir, *extra, env=None):
    return CliRunner().invoke(
        app, ["train", str(image_folder), "--out", str(run), "--lm", str(tiny_lm_dir), *COMMON, *extra], env=env
    )


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard (lqae[tensorboard])")
def test_tensorboard_events_hold_every_metric_and_the_sample_grid(image_folder, tiny_lm_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = train_cli(image_folder, run, tiny_lm_dir, "--tracker", "tensorboard", "--val", image_folder)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "recon_loss", "commit_recon_ratio", "code_perplexity", "val_psnr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert tags["images"] == ["samples"] and events.Images("samples")[0].step == 5
    assert "config/text_summary" in tags["tensors"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb (lqae[wandb])")
def test_wandb_offline_run_is_written_in_the_run_folder(image_folder, tiny_lm_dir, tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "config")}
    result = train_cli(image_folder, run, tiny_lm_dir, "--tracker", "wandb", env=env)
    assert result.exit_code == 0, result.output
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((run / "wandb").rglob("*"))


def test_a_missing_tracker_package_is_one_line_naming_the_install(image_folder, tiny_lm_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = train_cli(image_folder, tmp_path / "run", tiny_lm_dir, "--tracker", "wandb")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: --tracker wandb needs the wandb package: pip install 'lqae[wandb]'"]
    assert not (tmp_path / "run").exists()
