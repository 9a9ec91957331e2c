"""Issue 20, "Reliability, round two": each test names the item of the issue it holds to.

No NaN weights, no mixed checkpoints, no stale answers, no key in an error, bounded resources,
and one clear line for every bad value.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_fewshot_helpers import StubServer
from test_fewshot_openai import SECRET, backend_for, request
from typer.testing import CliRunner

from conftest import SMALL_GLOBAL_SETS, tiny_model_config, tiny_train_config, write_class_images
from lqae import checkpoint as ckpt
from lqae import io
from lqae.run_lock import RunLock
from lqae.training import loop as training, parts
from lqae.config import Masking, ModelConfig, TrainConfig
from lqae.presets import PRESETS, get_preset
from lqae.images.files import ImageFolder, is_readable_image, load_image, open_rgb
from lqae.images.source import collect_images
from lqae.training.data import TrainDataset
from lqae.errors import CheckpointError, ConfigError, DataError, LLMError, OutputError, TrainingError
from lqae.fewshot.backends import openai
from lqae.fewshot.prompts import TemplateError, load_template, parse_template
from lqae.run_folder import resolve_run
from lqae.tokendata import read_token_dataset
from lqae.callbacks import TrainCallback
from lqae.training import train
from lqae_cli.app import app


def invoke(*args, input: str | None = None):
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
        RunLock(tiny_checkpoint).acquire()
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
    ("grid_dim", 10**6, "grid_dim must be between"),
    ("exclude_special_tokens", "no", "exclude_special_tokens must be true or false"),
    ("mlp_ratio", float("nan"), "mlp_ratio must be a finite number"),
    ("lm_name", 5, "lm_name must be a string"),
    ("decoder_input", "embeddings", "decoder_input is unknown; choose one of: lm, lm_search, search"),
])
def test_bad_model_config_values_are_one_clear_line(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("field, value, needle", [
    ("steps", "abc", "steps must be an integer or null"),
    ("base_lr", -5, "base_lr must be at least"),
    ("seed", 1.5, "seed must be an integer"),
    ("hflip", "yes", "hflip must be true or false"),
    ("beta2", 1.0, "beta2 must be between"),
    ("mask", {"ratio": 0.5}, "mask must be a group of ratio, mlm_weight"),
])
def test_bad_train_config_values_are_one_clear_line(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{field: value})


def test_every_preset_and_an_old_checkpoint_still_pass_the_checks(tiny_checkpoint):
    for name in PRESETS:
        get_preset(name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model"]["mlp_ratio"] = 4  # an integer where a float is expected: still a number
    config["train"]["mask"]["mlm_weight"] = 0
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    assert ckpt.read_config(tiny_checkpoint)[0].mlp_ratio == 4
    assert ckpt.read_config(tiny_checkpoint)[1].mask.mlm_weight == 0
    good = json.loads(json.dumps(config))
    config["train"]["mask"]["ratio"] = "half"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mask.ratio must be a finite number"):
        ckpt.read_config(tiny_checkpoint)
    (tiny_checkpoint / "config.json").write_text(json.dumps(dict(good, step="abc")))
    with pytest.raises(CheckpointError, match="step must be a whole number, got 'abc'"):
        ckpt.read_config(tiny_checkpoint)


def test_set_and_options_with_bad_values_are_one_error_line(tiny_lm_dir, image_folder, tmp_path):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--quiet", *SMALL_GLOBAL_SETS]
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
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="keeps its checkpoint of step 1"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir),
              tiny_train_config(steps=6, base_lr=1e12, log_every=100, save_every=1))
    assert ckpt.read_config(run)[2] == 1
    model = ckpt.load_model(run)
    assert all(torch.isfinite(t).all() for t in model.trainable_state_dict().values())


def test_finiteness_is_read_only_at_log_lines_and_saves(tiny_lm_dir, image_folder, tmp_path, monkeypatch):
    checks = []
    check = parts.Health.check
    monkeypatch.setattr(parts.Health, "check", lambda self, *a: checks.append(1) or check(self, *a))
    training.train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir),
                   tiny_train_config(steps=6, log_every=3, save_every=100, sample_every=100, val_every=100))
    assert len(checks) == 3  # log lines at steps 3 and 6, the save at step 6: no host sync per step


def test_train_cli_reports_divergence_in_one_line(tiny_lm_dir, image_folder, tmp_path):
    result = invoke("train", image_folder, "--out", tmp_path / "nan1", "--lm", tiny_lm_dir, "--image-size", "16",
                    "--patch-size", "4", "--steps", "6", "--batch-size", "8", "--log-every", "1", "--lr", "1e12",
                    "--workers", "0", "--quiet", *SMALL_GLOBAL_SETS)
    assert_one_error_line(result, "diverged", "at step 2")
    strict_json_lines(tmp_path / "nan1" / "metrics.jsonl")


# -- item 10: --resume and changed options or data --------------------------------------------------


def test_resume_refuses_changed_options_and_other_data(tiny_lm_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    record = (run / "data.json").read_text()
    with pytest.raises(ConfigError, match=r"batch_size \(trained with 8, asked 4\)"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4, batch_size=4, base_lr=0.1),
              resume=True)
    with pytest.raises(ConfigError, match=r"mask.ratio \(trained with 0.5, asked 0.1\)"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4, mask=Masking(ratio=0.1)),
              resume=True)
    other = write_class_images(tmp_path / "other", seed=3)

    with pytest.raises(DataError, match="holds other data"):
        train(other, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4), resume=True)
    assert (run / "data.json").read_text() == record and ckpt.read_config(run)[2] == 2
    moved = tmp_path / "moved"
    image_folder.rename(moved)  # the same images elsewhere: fine, and the record keeps its data
    train(moved, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3, log_every=5), resume=True)
    assert ckpt.read_config(run)[2] == 3
    assert json.loads((run / "data.json").read_text())["train"] == json.loads(record)["train"]


def test_resume_on_the_command_line_compares_only_the_options_given(tiny_lm_dir, image_folder, tmp_path):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--quiet", *SMALL_GLOBAL_SETS,
              "--workers", "0"]
    first = invoke("train", image_folder, "--out", tmp_path / "run", "--steps", "1", *common)
    assert first.exit_code == 0, first.output
    for args, needle in [
        (["--batch-size", "8"], "batch_size (trained with 4, asked 8)"),
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
    path = folder / "red" / "cut.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:1500])
    assert is_readable_image(path)  # the header check passes: only decoding finds it
    return path


def test_a_truncated_image_inside_a_folder_is_skipped_and_named_everywhere(tiny_checkpoint, image_folder, tmp_path):
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
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    result = subprocess.run([sys.executable, "-m", "lqae_cli", "encode", str(pipe), "-m", str(tiny_checkpoint)],
                            capture_output=True, text=True, timeout=120)  # a hang fails here
    assert result.returncode == 1 and "not a regular file" in result.stderr and "Traceback" not in result.stderr


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_temp_files_and_names_the_target(tiny_model, tiny_checkpoint, image_folder, tmp_path,
                                                               monkeypatch):
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
    with pytest.raises(OutputError, match=f"cannot write {run / 'model.safetensors'}: No space left"):
        ckpt.save_checkpoint(run, tiny_model, step=2)
    assert not (run / ".saving").exists() and (run / "model.safetensors").read_bytes() == before


# -- item 16: decompression bombs and PIL's raw warnings ----------------------------------------------


def test_large_images_get_a_clean_warning_and_bombs_are_named_as_such(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # warns above 100 pixels, refuses above 200
    Image.new("RGB", (12, 12)).save(tmp_path / "large.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING, logger="lqae"):
        warnings.simplefilter("always")
        open_rgb(tmp_path / "large.png")
    assert raw == [] and "large.png is a very large image" in caplog.text
    with pytest.raises(Exception, match="bomb.png: too large to decode safely.*decompression bomb"):
        collect_images([tmp_path / "bomb.png"])


# -- items 3 and 4: the few-shot results file ---------------------------------------------------------


def fewshot_json(*args):
    result = invoke("fewshot", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_labelling_answers_are_keyed_by_content_and_the_read_back_is_said(tiny_checkpoint, image_folder, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(image_folder / "red" / "red_001.png", queries / "a.png")
    shutil.copy(image_folder / "red" / "red_002.png", queries / "b.png")
    out = tmp_path / "labels.jsonl"
    common = ["--support", image_folder, queries / "a.png", queries / "b.png", "-m", tiny_checkpoint, "--llm", "overlap",
              "--json", "--out", out]
    first, _ = fewshot_json(*common)
    assert first["resumed"] == 0
    again, note = fewshot_json(*common)
    assert again["resumed"] == 2 and "2 of 2 answer(s) read back from" in note
    shutil.copy(image_folder / "blue" / "blue_003.png", queries / "a.png")  # another image at the same path
    changed, note = fewshot_json(*common)
    assert changed["resumed"] == 1 and "1 of 2 answer(s) read back" in note
    assert len(out.read_text().splitlines()) == 3


def test_fewshot_out_checks_the_whole_file_before_touching_it(tiny_checkpoint, image_folder, tmp_path):
    common = ["--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--llm", "overlap",
              "--ways", "2", "--episodes", "3", "--json", "--quiet"]
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\nhalf a line")
    assert_one_error_line(invoke("fewshot", *common, "--out", notes), "not JSON")
    assert notes.read_bytes() == b"my notes\nhalf a line"
    results = tmp_path / "results.jsonl"
    fewshot_json(*common, "--out", results, "--seed", "0")
    with open(results, "ab") as handle:
        handle.write(b'{"episode": 3, "run": "another wri')  # a writer mid-line
    before = results.read_bytes()
    assert_one_error_line(invoke("fewshot", *common, "--out", results, "--seed", "1"), "another run")
    with open(results, "rb") as holder:  # another process is appending to it
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        assert_one_error_line(invoke("fewshot", *common, "--out", results, "--seed", "0"), "being written by another")
    assert results.read_bytes() == before
    resumed, _ = fewshot_json(*common, "--out", results, "--seed", "0")  # ours, unlocked: the cut line goes
    assert resumed["resumed"] == 3 and results.read_bytes() == before[: before.rindex(b"\n") + 1]


# -- item 11: class names in PATH<TAB>LABEL lines and prompts ---------------------------------------


def test_class_names_that_would_break_lines_or_prompts_are_refused(tiny_checkpoint, tmp_path):
    evil = write_class_images(tmp_path / "evil", classes=("red", "evil\nOutput: {label}"))
    query = next((evil / "red").glob("*.png"))
    result = invoke("fewshot", "--support", evil, query, "-m", tiny_checkpoint, "--llm", "overlap", "--json")
    assert_one_error_line(result, "line break")
    comma = write_class_images(tmp_path / "comma", classes=("red", "cats, dogs"))
    result = invoke("fewshot", "--support", comma, query, "-m", tiny_checkpoint, "--llm", "overlap")
    assert_one_error_line(result, "comma", "--labels letters")
    letters = invoke("fewshot", "--support", comma, query, "-m", tiny_checkpoint, "--llm", "overlap", "--labels",
                     "letters", "--scoring", "constrained")
    assert letters.exit_code == 0, letters.output


# -- items 12, 14, 15 and 16: what a server answers ---------------------------------------------------


def openai_backend(url, **kwargs):
    return backend_for(url, **kwargs)


def test_nan_log_probs_from_a_server_are_an_error():
    with StubServer(mode="nan") as server:
        with pytest.raises(LLMError, match="not finite numbers"):
            openai_backend(server.url).loglik(request())


def test_a_servers_reply_never_shows_the_key_even_cut_in_the_middle():
    with StubServer(mode="echo-headers") as server:
        with pytest.raises(LLMError, match="not JSON") as info:
            openai_backend(server.url).loglik(request())
    assert SECRET[:6] not in str(info.value) and "Bearer ***" in str(info.value)


def test_the_timeout_bounds_the_whole_request_not_each_read():
    with StubServer(mode="trickle") as server:  # one byte per 50 ms: 11 s for the whole reply
        with pytest.raises(LLMError, match="no answer within --timeout 1 s"):
            openai_backend(server.url, timeout=1, retries=0).loglik(request())
        sent, server.stop = server.trickled, True
    assert sent < 100  # given up at the deadline, long before the last of its 215 bytes


def test_a_huge_reply_is_refused_not_read_whole(monkeypatch):
    monkeypatch.setattr(openai, "MAX_REPLY_BYTES", 100_000)
    with StubServer(mode="huge", huge_bytes=300_000) as server:
        with pytest.raises(LLMError, match="more than 100,000 bytes"):
            openai_backend(server.url).loglik(request())


def test_a_reply_whose_content_is_not_text_is_an_error():
    with StubServer(chat_reply=123) as server:
        with pytest.raises(LLMError, match="content is not text"):
            openai_backend(server.url).generate(request("chat"), 4)


def test_template_errors_say_what_is_wrong(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"[example]\nInput: {text} caf\xe9\nOutput: {label}\n[query]\nInput: {text}\nOutput: {label}\n")
    with pytest.raises(TemplateError, match="not UTF-8 text"):
        load_template(latin)
    with pytest.raises(TemplateError, match=r"\{text!r\} takes no conversion or format spec; write \{text\}"):
        parse_template("[example]\n{text!r} {label}\n[query]\n{text} {label}\n")


def test_a_hub_revision_that_is_a_path_never_reaches_the_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("reached the hub"))
    with pytest.raises(CheckpointError, match="not a branch, tag or commit name"):
        resolve_run("org/name@../../x")


# -- item 13: statistics that mislead -----------------------------------------------------------------


def test_reused_queries_and_a_single_support_class_are_warned_about(tiny_checkpoint, image_folder, tmp_path):
    summary, note = fewshot_json("--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--llm",
                                 "overlap", "--ways", "2", "--episodes", "40", "--json")
    assert summary["distinct_queries"] <= 12 and "assumes 40 independent episodes" in note
    single = write_class_images(tmp_path / "single", classes=("red",))
    query = next((image_folder / "blue").glob("*.png"))
    result = invoke("fewshot", "--support", single, query, "-m", tiny_checkpoint, "--llm", "overlap")
    assert result.exit_code == 0 and result.stdout.strip() == "red"
    assert "one class (red): every query is given that label" in result.stderr


# -- item 15: a huge line on decode's stdin -----------------------------------------------------------


def test_decode_refuses_a_huge_line_before_the_tokenizer_sees_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.png"
    result = invoke("decode", "-m", tiny_checkpoint, "--out", out, input="baba " * 400_000)
    assert_one_error_line(result, "characters long", "16 tokens")
    assert not out.exists()
