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
    ("base_lr", -5, "base_lr must be between"),
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
        (["--lr", "-5"], "base_lr must be between"),
        (["--set", "exclude_special_tokens=no"], "exclude_special_tokens must be true or false"),
    ]:
        assert_one_error_line(invoke("train", image_folder, "--out", tmp_path / "run", *common, *args), needle)
    assert not (tmp_path / "run").exists()
