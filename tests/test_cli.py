import json
import os
import subprocess
import sys

import pytest
from conftest import SMALL_GLOBAL_SETS
from typer.testing import CliRunner

from lqae.checkpoint import read_config
from lqae.run_lock import RunLock

COMMANDS = ["train", "encode", "decode", "eval", "probe", "fewshot", "card", "push"]
runner = CliRunner()
HELP_CHECK = """
import sys
from typer.testing import CliRunner
from lqae_cli.app import app
result = CliRunner().invoke(app, ARGS)
assert result.exit_code == 0, result.output
heavy = [name for name in ("torch", "transformers", "tiktoken") if name in sys.modules]
assert not heavy, f"--help imported {heavy}"
print(result.output)
"""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_an_example_and_imports_neither_torch_nor_transformers(command):
    """`lqae --help` lists every command; each command's help shows an Example; none loads the model stack."""
    args = ["--help"] if command is None else [command, "--help"]
    code = HELP_CHECK.replace("ARGS", repr(args))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if command is None:
        assert all(name in result.stdout for name in COMMANDS)
    else:
        assert "Example" in result.stdout


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lqae_cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_one_clean_error(result, pattern):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and pattern in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_train_bad_inputs_give_one_clear_line(tmp_path, tiny_lm_dir):
    assert_one_clean_error(run_cli("train", tmp_path / "missing", "--out", tmp_path / "run", "--lm", tiny_lm_dir), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_clean_error(run_cli("train", tmp_path / "empty", "--out", tmp_path / "run", "--lm", tiny_lm_dir), "no readable images")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"\x89PNG broken")
    assert_one_clean_error(run_cli("train", tmp_path / "corrupt", "--out", tmp_path / "run", "--lm", tiny_lm_dir), "1 unreadable")
    assert not (tmp_path / "run").exists()


def test_train_cli_end_to_end_then_resume(tmp_path, tiny_lm_dir, image_folder):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--quiet", "--workers", "0",
              *SMALL_GLOBAL_SETS]
    first = run_cli("train", image_folder, "--out", tmp_path / "run", "--steps", "2", *common)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "model.safetensors").exists() and first.stdout == ""
    again = run_cli("train", image_folder, "--out", tmp_path / "run", "--steps", "2", *common)
    assert_one_clean_error(again, "--resume")

    with RunLock(tmp_path / "run"):  # another trainer holds the folder
        second = run_cli("train", image_folder, "--out", tmp_path / "run", "--steps", "3", "--resume", *common)
        assert_one_clean_error(second, f"being trained by process {os.getpid()}")
    resumed = run_cli("train", image_folder, "--out", tmp_path / "run", "--steps", "3", "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr

    assert read_config(tmp_path / "run")[2] == 3


def test_train_banner_says_the_precision_it_resolved(tmp_path, tiny_lm_dir, image_folder):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--workers", "0",
              *SMALL_GLOBAL_SETS]
    for precision in ("fp32", "bf16"):
        result = run_cli("train", image_folder, "--out", tmp_path / precision, "--steps", "1", "--precision", precision,
                         *common)
        assert result.returncode == 0, result.stderr
        assert f"cpu x1 {precision}, lr" in result.stderr


def test_train_set_overrides_any_config_field(tmp_path, tiny_lm_dir, image_folder):
    common = ["--lm", tiny_lm_dir, "--image-size", "16", "--patch-size", "4", "--batch-size", "4", "--quiet", "--workers", "0",
              *SMALL_GLOBAL_SETS]
    result = run_cli("train", image_folder, "--out", tmp_path / "run", "--steps", "1", *common,
                     "--set", "encoder_output=linear", "--set", "mask.ratio=0.3", "--set", "distill_teacher_momentum=0.9",
                     "--set", "weight_decay=0.5")
    assert result.returncode == 0, result.stderr

    model, train, _ = read_config(tmp_path / "run")
    assert (model.encoder_output, train.mask.ratio, train.distill.teacher_momentum, train.weight_decay) == (
        "linear", 0.3, 0.9, 0.5)
    assert_one_clean_error(run_cli("train", image_folder, "--out", tmp_path / "r2", *common, "--set", "colour=red"),
                           "unknown config field 'colour'")
    assert_one_clean_error(run_cli("train", image_folder, "--out", tmp_path / "r2", *common, "--set", "search_space=pca"),
                           "search_space is unknown; choose one of: embedding, grid")
    assert not (tmp_path / "r2").exists()


def test_debug_env_shows_traceback(tmp_path, tiny_lm_dir):
    env = dict(os.environ, LQAE_DEBUG="1")
    result = subprocess.run(
        [sys.executable, "-m", "lqae_cli", "train", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--lm", str(tiny_lm_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_gloo(tmp_path, tiny_lm_dir, image_folder):
    """torchrun with 2 CPU processes (gloo): trains, only rank 0 writes, weights stay in sync."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lqae_cli",
         "train", str(image_folder), "--out", str(tmp_path / "run"), "--lm", str(tiny_lm_dir), "--image-size", "16",
         "--patch-size", "4", "--batch-size", "4", "--steps", "2", "--log-every", "1", "--quiet", "--workers", "0", "--device", "cpu",
         *SMALL_GLOBAL_SETS],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]  # one writer, not two

    assert read_config(tmp_path / "run")[2] == 2
