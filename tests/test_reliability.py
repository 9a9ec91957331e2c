"""Issue 20, "Reliability, round two": each test names the item of the issue it holds to.

No NaN weights, no mixed checkpoints, no stale answers, no key in an error, bounded resources,
and one clear line for every bad value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model_config, tiny_train_config
from lqae import checkpoint as ckpt
from lqae.errors import CheckpointError, ConfigError


def invoke(*args, input: str | None = None):
    from lqae_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- item 2: a kill between the renames of a save -------------------------------------------------


class Killed(BaseException):
    """What a kill -9 looks like to the code after it: nothing more runs (no except, no finally of ours)."""


@pytest.mark.parametrize("moves_done", [0, 1, 2, 3])
def test_a_save_killed_after_any_rename_is_rolled_forward_to_one_step(tiny_model, tmp_path, monkeypatch, moves_done):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=60, train_state={"x": torch.zeros(2)})
    replace, done = os.replace, []

    def killed_after_some(source, target):
        if len(done) == moves_done:
            raise Killed
        done.append(target)
        replace(source, target)

    monkeypatch.setattr(ckpt.os, "replace", killed_after_some)
    if moves_done == 3:  # every file moved, killed before the journal was removed
        fsync_dir = ckpt.fsync_dir

        def killed_at_the_run_folder(path):
            if Path(path) == run:
                raise Killed
            fsync_dir(path)

        monkeypatch.setattr(ckpt, "fsync_dir", killed_at_the_run_folder)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=61, train_state={"x": torch.ones(2)})
    monkeypatch.undo()
    assert (run / ".saving").is_dir()
    assert ckpt.read_config(run)[2] == 61  # the next reader finishes the moves
    assert ckpt.load_train_state(run)[2] == 61
    assert ckpt.load_model(run) is not None
    assert not (run / ".saving").exists()


# -- item 5: a symlinked RUN/.lock ----------------------------------------------------------------


def test_a_symlinked_lock_is_never_written_through(tiny_checkpoint, image_folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tiny_checkpoint / ".lock").symlink_to(victim)
    (tiny_checkpoint / ".saving").mkdir()  # a journal makes a reader take the lock
    image = next((image_folder / "red").glob("*.png"))
    result = invoke("encode", image, "-m", tiny_checkpoint)
    assert_one_error_line(result, "symbolic link")
    with pytest.raises(CheckpointError, match="symbolic link"):
        ckpt.RunLock(tiny_checkpoint).acquire()
    assert victim.read_text() == "precious\n"


# -- item 9: corrupt weights ----------------------------------------------------------------------


def test_flipped_bytes_in_the_weights_are_refused_not_loaded(tiny_checkpoint, image_folder):
    weights = tiny_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 1000, header + 1000 + 4096):
        data[i] ^= 0x01  # flips the lowest mantissa bit: every value stays finite
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the fingerprint recorded"):
        ckpt.load_model(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_trainable_from(tiny_checkpoint)
    image = next((image_folder / "red").glob("*.png"))
    assert_one_error_line(invoke("encode", image, "-m", tiny_checkpoint), "fingerprint")


# -- item 1: non-finite weights are neither saved nor loaded ----------------------------------------


def test_non_finite_weights_are_not_saved_and_not_loaded(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, step=1)
    before = (run / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(tiny_model.encoder.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="refusing to save non-finite weights at step 2"):
        ckpt.save_checkpoint(run, tiny_model, step=2)
    assert (run / "model.safetensors").read_bytes() == before and ckpt.read_config(run)[2] == 1
    weights = load_file(run / "model.safetensors")  # a diverged file from before the check
    weights[sorted(weights)[0]] = torch.full_like(weights[sorted(weights)[0]], float("nan"))
    save_file(weights, run / "model.safetensors", metadata={"step": "1"})
    with pytest.raises(CheckpointError, match="non-finite weights"):
        ckpt.load_model(run)


# -- item 16: config values -----------------------------------------------------------------------


@pytest.mark.parametrize("field, value, needle", [
    ("patch_size", 0, "patch_size must be between 1"),
    ("image_size", 32.0, "image_size must be an integer"),
    ("image_size", 10**9, "image_size must be between"),
    ("latent_dim", 10**6, "latent_dim must be between"),
    ("exclude_special_tokens", "no", "exclude_special_tokens must be true or false"),
    ("mask_ratio", float("nan"), "mask_ratio must be a finite number"),
    ("lm_name", 5, "lm_name must be a string"),
])
def test_bad_model_config_values_are_one_clear_line(field, value, needle):
    from lqae.config import ModelConfig

    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("field, value, needle", [
    ("steps", "abc", "steps must be an integer or null"),
    ("base_lr", -5, "base_lr must be at least"),
    ("seed", 1.5, "seed must be an integer"),
    ("hflip", "yes", "hflip must be true or false"),
    ("beta2", 1.0, "beta2 must be between"),
])
def test_bad_train_config_values_are_one_clear_line(field, value, needle):
    from lqae.config import TrainConfig

    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{field: value})


def test_every_preset_and_an_old_checkpoint_still_pass_the_checks(tiny_checkpoint):
    from lqae.config import PRESETS, get_preset

    for name in PRESETS:
        get_preset(name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model"]["recon_weight"] = 1  # an integer where a float is expected: still a number
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    assert ckpt.read_config(tiny_checkpoint)[0].recon_weight == 1


def test_set_and_options_with_bad_values_are_one_error_line(tiny_lm_dir, image_folder, tmp_path):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--quiet"]
    for args, needle in [
        (["--set", "patch_size=0"], "patch_size must be between 1"),
        (["--set", "steps=abc"], "steps must be an integer or null"),
        (["--lr", "-5"], "base_lr must be at least"),
        (["--set", "exclude_special_tokens=no"], "exclude_special_tokens must be true or false"),
    ]:
        assert_one_error_line(invoke("train", image_folder, "--out", tmp_path / "run", *common, *args), needle)
    assert not (tmp_path / "run").exists()


# -- item 1: a diverging run stops, names the step, and keeps the last good checkpoint ----------------


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_nan_loss_stops_training_at_the_next_log_line_naming_its_step(tiny_lm_dir, image_folder, tmp_path):
    from lqae.errors import TrainingError
    from lqae.train import TrainCallback, train

    class Steps(TrainCallback):
        seen: list[int] = []

        def on_step(self, step, metrics):
            self.seen.append(step)

    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="diverged.*at step 2.*nothing was saved.*lower --lr"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir),
              tiny_train_config(steps=6, base_lr=1e12, log_every=3, save_every=100), callbacks=[Steps()])
    assert Steps.seen == [1, 2]  # found at step 3's log line, not by a sync at every step
    lines = strict_json_lines(run / "metrics.jsonl")  # no bare NaN
    assert [line["step"] for line in lines] == [3] and lines[0]["loss"] is None
    assert not (run / "model.safetensors").exists()


def test_a_diverged_run_keeps_its_last_good_checkpoint(tiny_lm_dir, image_folder, tmp_path):
    from lqae.errors import TrainingError
    from lqae.train import train

    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="keeps its checkpoint of step 1"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir),
              tiny_train_config(steps=6, base_lr=1e12, log_every=100, save_every=1))
    assert ckpt.read_config(run)[2] == 1
    model = ckpt.load_model(run)
    assert all(torch.isfinite(t).all() for t in model.trainable_state_dict().values())


def test_finiteness_is_read_only_at_log_lines_and_saves(tiny_lm_dir, image_folder, tmp_path, monkeypatch):
    from lqae import train as training

    checks = []
    check = training._Health.check
    monkeypatch.setattr(training._Health, "check", lambda self, *a: checks.append(1) or check(self, *a))
    training.train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir),
                   tiny_train_config(steps=6, log_every=3, save_every=100, sample_every=100, val_every=100))
    assert len(checks) == 3  # log lines at steps 3 and 6, the save at step 6: no host sync per step


def test_train_cli_reports_divergence_in_one_line(tiny_lm_dir, image_folder, tmp_path):
    result = invoke("train", image_folder, "--out", tmp_path / "nan1", "--lm", tiny_lm_dir, "--image-size", "16",
                    "--patch-size", "4", "--steps", "6", "--batch-size", "8", "--log-every", "1", "--lr", "1e12",
                    "--workers", "0", "--quiet")
    assert_one_error_line(result, "diverged", "at step 2")
    strict_json_lines(tmp_path / "nan1" / "metrics.jsonl")


# -- item 10: --resume and changed options or data --------------------------------------------------


def test_resume_refuses_changed_options_and_other_data(tiny_lm_dir, image_folder, tmp_path):
    from conftest import write_class_images
    from lqae.train import train

    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    record = (run / "data.json").read_text()
    with pytest.raises(ConfigError, match=r"batch_size \(trained with 8, asked 4\).*base_lr"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4, batch_size=4, base_lr=0.1),
              resume=True)
    with pytest.raises(ConfigError, match="mask_ratio"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir, mask_ratio=0.1), tiny_train_config(steps=4), resume=True)
    other = write_class_images(tmp_path / "other", seed=3)
    from lqae.errors import DataError

    with pytest.raises(DataError, match="holds other data"):
        train(other, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4), resume=True)
    assert (run / "data.json").read_text() == record and ckpt.read_config(run)[2] == 2
    moved = tmp_path / "moved"
    image_folder.rename(moved)  # the same images elsewhere: fine, and the record keeps its data
    train(moved, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3, log_every=5), resume=True)
    assert ckpt.read_config(run)[2] == 3
    assert json.loads((run / "data.json").read_text())["train"] == json.loads(record)["train"]


def test_resume_on_the_command_line_compares_only_the_options_given(tiny_lm_dir, image_folder, tmp_path):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--quiet",
              "--workers", "0"]
    first = invoke("train", image_folder, "--out", tmp_path / "run", "--steps", "1", *common)
    assert first.exit_code == 0, first.output
    for args, needle in [
        (["--batch-size", "8"], "batch_size (trained with 4, asked 8)"),
        (["--lr", "0.5"], "base_lr"),
        (["--set", "weight_decay=0.3"], "weight_decay"),
        (["--preset", "small"], "encoder_width (trained with 128, asked 384)"),
    ]:
        result = invoke("train", image_folder, "--out", tmp_path / "run", "--steps", "2", "--resume", *common, *args)
        assert_one_error_line(result, "--resume", needle)
    bare = invoke("train", image_folder, "--out", tmp_path / "run", "--steps", "2", "--resume", "--quiet")
    assert bare.exit_code == 0, bare.output  # nothing asked but more steps: the saved configuration goes on
    assert ckpt.read_config(tmp_path / "run")[2] == 2
