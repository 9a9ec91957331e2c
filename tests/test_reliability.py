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


# -- item 6: encode --out over a file that is not a token dataset ------------------------------------


def test_encode_out_never_replaces_a_checkpoints_weights(tiny_checkpoint, image_folder, tmp_path):
    weights = tiny_checkpoint / "model.safetensors"
    before = weights.read_bytes()
    result = invoke("encode", image_folder, "-m", tiny_checkpoint, "--out", weights, "-q")
    assert_one_error_line(result, "is not a token dataset", "refusing to overwrite")
    assert weights.read_bytes() == before
    tokens = tmp_path / "t.safetensors"
    for _ in range(2):  # an older token dataset is replaced as before
        assert invoke("encode", image_folder, "-m", tiny_checkpoint, "--out", tokens, "-q").exit_code == 0


# -- item 7: EXIF orientation ------------------------------------------------------------------------


def write_sideways(folder: Path) -> tuple[Path, Path]:
    """A phone-style photo (pixels stored sideways, EXIF orientation 6) and the same picture upright."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((12, 24, 3), dtype=np.uint8)
    pixels[:, :8] = (220, 30, 30)
    pixels[:4, 8:] = (30, 30, 220)
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(folder / "phone.png", exif=exif)
    stored.transpose(Image.Transpose.ROTATE_270).save(folder / "upright.png")
    return folder / "phone.png", folder / "upright.png"


def test_exif_orientation_is_applied_wherever_images_are_read(tiny_checkpoint, tmp_path):
    import numpy as np

    from lqae.data import ImageFolder, TrainDataset, load_image, open_rgb

    phone, upright = write_sideways(tmp_path / "photos")
    assert open_rgb(phone).size == (12, 24)
    assert np.array_equal(np.asarray(open_rgb(phone)), np.asarray(open_rgb(upright)))
    assert torch.equal(load_image(phone, 16), load_image(upright, 16))  # encode, eval, probe, fewshot
    folder = ImageFolder(tmp_path, [phone, upright], [-1, -1], [])
    dataset = TrainDataset(folder, 16, augment=False)
    assert torch.equal(dataset[(0, 0)], dataset[(1, 0)])  # training
    phone_tokens = invoke("encode", phone, "-m", tiny_checkpoint, "-f", "ids")
    upright_tokens = invoke("encode", upright, "-m", tiny_checkpoint, "-f", "ids")
    assert phone_tokens.exit_code == 0 and phone_tokens.stdout == upright_tokens.stdout


# -- item 8: an image that fails only when decoded, inside a folder ----------------------------------


def add_truncated_jpeg(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    from lqae.data import is_readable_image

    path = folder / "red" / "cut.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:1500])
    assert is_readable_image(path)  # the header check passes: only decoding finds it
    return path


def test_a_truncated_image_inside_a_folder_is_skipped_and_named_everywhere(tiny_checkpoint, image_folder, tmp_path):
    from lqae.tokendata import read_token_dataset

    cut = add_truncated_jpeg(image_folder)
    printed = invoke("encode", image_folder, "-m", tiny_checkpoint, "-f", "ids")
    assert printed.exit_code == 0, printed.output
    assert len(printed.stdout.splitlines()) == 12 and "cut.jpg" in printed.stderr
    tokens = tmp_path / "t.safetensors"
    written = invoke("encode", image_folder, "-m", tiny_checkpoint, "--out", tokens)
    assert written.exit_code == 0, written.output
    dataset = read_token_dataset(tokens)
    assert len(dataset) == 12 and str(cut) not in dataset.paths and "cut.jpg" in written.stderr
    assert dataset.labels.tolist() == [0] * 6 + [1] * 6
    evaluated = invoke("eval", image_folder, "-m", tiny_checkpoint, "--json")
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["images"] == 12
    labelled = invoke("fewshot", "--support", image_folder, image_folder, "-m", tiny_checkpoint, "--llm", "overlap",
                      "--json")
    assert labelled.exit_code == 0, labelled.output
    assert len(json.loads(labelled.stdout)["predictions"]) == 12
    named = invoke("encode", cut, "-m", tiny_checkpoint)  # named on its own: an error, as before
    assert_one_error_line(named, "cut.jpg")


def test_training_validates_past_a_truncated_image_and_saves_before_validating(
    tiny_lm_dir, image_folder, tmp_path, monkeypatch
):
    from lqae import train as training
    from lqae.errors import DataError

    add_truncated_jpeg(image_folder)
    result = training.train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2),
                            val_dir=image_folder)
    assert result.step == 2 and result.validation["val_images"] == 12

    def failing_validation(*args, **kwargs):
        raise DataError("the validation folder went away")

    monkeypatch.setattr(training, "evaluate_reconstruction", failing_validation)
    with pytest.raises(DataError, match="went away"):
        training.train(image_folder, tmp_path / "run2", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2),
                       val_dir=image_folder)
    assert ckpt.read_config(tmp_path / "run2")[2] == 2  # the steps before the failing pass were saved


# -- item 15: a named pipe as an image; a full disk ---------------------------------------------------


def test_a_named_pipe_given_as_an_image_is_refused_not_opened(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    result = subprocess.run([sys.executable, "-m", "lqae_cli", "encode", str(pipe), "-m", str(tiny_checkpoint)],
                            capture_output=True, text=True, timeout=120)  # a hang fails here
    assert result.returncode == 1 and "not a regular file" in result.stderr and "Traceback" not in result.stderr


def no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_temp_files_and_names_the_target(tiny_model, tiny_checkpoint, image_folder, tmp_path,
                                                               monkeypatch):
    from lqae import io
    from lqae.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(OutputError, match=rf"cannot write {out / 'a.json'}: No space left on device"):
        io.atomic_write_bytes(out / "a.json", b"{}")
    tokens = out / "t.safetensors"
    result = invoke("encode", image_folder, "-m", tiny_checkpoint, "--out", tokens, "-q")
    assert_one_error_line(result, f"cannot write {tokens}", "No space left")
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, step=1)
    before = (run / "model.safetensors").read_bytes()
    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(OutputError, match=f"cannot write {run}"):
        ckpt.save_checkpoint(run, tiny_model, step=2)
    assert not (run / ".saving").exists() and (run / "model.safetensors").read_bytes() == before


# -- item 16: decompression bombs and PIL's raw warnings ----------------------------------------------


def test_large_images_get_a_clean_warning_and_bombs_are_named_as_such(tmp_path, monkeypatch, caplog):
    import logging
    import warnings

    from PIL import Image

    from lqae.data import collect_images, open_rgb

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # warns above 100 pixels, refuses above 200
    Image.new("RGB", (12, 12)).save(tmp_path / "large.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="lqae"):
        warnings.simplefilter("always")
        open_rgb(tmp_path / "large.png")
    assert raw == [] and "large.png is a very large image" in caplog.text
    with pytest.raises(Exception, match="bomb.png: too large to decode safely.*decompression bomb"):
        collect_images([tmp_path / "bomb.png"])
