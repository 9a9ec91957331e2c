"""Token ids are bound to the weights that wrote them; resumable few-shot results to the model and data."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import lqae.io as io
from lqae.checkpoint import load_model, save_checkpoint, weights_fingerprint
from lqae.errors import DataError
from lqae.io import atomic_write_bytes
from lqae.tokendata import read_token_dataset
from lqae_cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def encode_to(folder, checkpoint, out):
    result = invoke("encode", folder, "-m", checkpoint, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return out


def test_checkpoints_record_a_fingerprint_of_their_weights(tiny_checkpoint, other_checkpoint, tmp_path):
    first, second = load_model(tiny_checkpoint), load_model(other_checkpoint)
    assert first.config == second.config
    assert first.weights_fingerprint != second.weights_fingerprint
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["fingerprint"] == first.weights_fingerprint
    assert weights_fingerprint(first.trainable_state_dict()) == first.weights_fingerprint


def test_token_datasets_record_the_weights_that_wrote_them(tiny_checkpoint, image_folder, tmp_path):
    tokens = encode_to(image_folder, tiny_checkpoint, tmp_path / "t.safetensors")
    assert read_token_dataset(tokens).weights == load_model(tiny_checkpoint).weights_fingerprint


def test_decode_refuses_tokens_of_other_weights_unless_allowed(tiny_checkpoint, other_checkpoint, image_folder, tmp_path):
    tokens = encode_to(image_folder, tiny_checkpoint, tmp_path / "t.safetensors")
    out = tmp_path / "decoded"
    assert_error(invoke("decode", "--from", tokens, "-m", other_checkpoint, "--out", out), "other weights",
                 "--allow-foreign-tokens")
    assert not out.exists()
    allowed = invoke("decode", "--from", tokens, "-m", other_checkpoint, "--out", out, "--allow-foreign-tokens", "-q")
    assert allowed.exit_code == 0, allowed.output
    assert "other weights" in allowed.stderr and len(list(out.glob("*.png"))) == 12
    same = invoke("decode", "--from", tokens, "-m", tiny_checkpoint, "--out", tmp_path / "same", "-q")
    assert same.exit_code == 0 and same.stderr == "", same.output


def test_probe_refuses_train_and_val_tokens_of_other_weights(tiny_checkpoint, other_checkpoint, image_folder, tmp_path):
    train = encode_to(image_folder, tiny_checkpoint, tmp_path / "train.safetensors")
    val = encode_to(image_folder, other_checkpoint, tmp_path / "val.safetensors")
    common = ["--baseline", "none", "--epochs", "2", "-q", "--json"]
    assert_error(invoke("probe", train, "--val", val, "-m", tiny_checkpoint, *common), "VAL", "other weights")
    allowed = invoke("probe", train, "--val", val, "-m", tiny_checkpoint, *common, "--allow-foreign-tokens")
    assert allowed.exit_code == 0, allowed.output


def test_probe_warns_when_val_shares_images_with_train(tiny_checkpoint, image_folder, caplog):
    result = invoke("probe", image_folder, "--val", image_folder, "-m", tiny_checkpoint, "--baseline", "none",
                    "--epochs", "2", "-q", "--json")
    assert result.exit_code == 0, result.output
    assert "12 of 12 VAL images are also in TRAIN" in result.stderr


def test_fewshot_refuses_support_and_query_tokens_of_other_weights(tiny_checkpoint, other_checkpoint, image_folder, tmp_path):
    support = encode_to(image_folder, tiny_checkpoint, tmp_path / "support.safetensors")
    query = encode_to(image_folder, other_checkpoint, tmp_path / "query.safetensors")
    common = ["--llm", "overlap", "--ways", "2", "--shots", "1", "--episodes", "4", "--json", "--quiet"]
    assert_error(invoke("fewshot", "--support", support, "--query", query, *common), "other weights")
    one = next((image_folder / "red").glob("*.png"))
    assert_error(invoke("fewshot", "--support", support, one, "-m", other_checkpoint, "--llm", "overlap"), "other weights")
    allowed = invoke("fewshot", "--support", support, "--query", query, *common, "--allow-foreign-tokens")
    assert allowed.exit_code == 0, allowed.output


def test_fewshot_results_do_not_resume_across_models_or_re_encoded_data(
    tiny_checkpoint, other_checkpoint, image_folder, tmp_path
):
    out = tmp_path / "results.jsonl"
    common = ["--query", image_folder, "--llm", "overlap", "--ways", "2", "--shots", "1", "--episodes", "6",
              "--seed", "0", "--json", "--quiet", "--out", out]
    first = invoke("fewshot", "--support", image_folder, "-m", tiny_checkpoint, *common)
    assert first.exit_code == 0, first.output
    again = invoke("fewshot", "--support", image_folder, "-m", tiny_checkpoint, *common)
    assert json.loads(again.stdout)["resumed"] == 6
    assert_error(invoke("fewshot", "--support", image_folder, "-m", other_checkpoint, *common), "another run",
                 "use another --out")
    # token datasets re-encoded at the same paths by other weights
    support, query = tmp_path / "s.safetensors", tmp_path / "q.safetensors"
    tokens_out = tmp_path / "tokens.jsonl"
    token_common = ["--llm", "overlap", "--ways", "2", "--shots", "1", "--episodes", "6", "--json", "--quiet",
                    "--out", tokens_out]
    for checkpoint in (tiny_checkpoint, other_checkpoint):
        encode_to(image_folder, checkpoint, support)
        encode_to(image_folder, checkpoint, query)
        result = invoke("fewshot", "--support", support, "--query", query, *token_common)
        if checkpoint == tiny_checkpoint:
            assert result.exit_code == 0, result.output
    assert_error(result, "another run", "use another --out")


def test_written_files_respect_the_umask(tiny_checkpoint, image_folder, tmp_path, tiny_model):
    old = os.umask(0o022)
    try:
        tokens = encode_to(image_folder, tiny_checkpoint, tmp_path / "t.safetensors")
        decoded = tmp_path / "d.png"
        assert invoke("decode", "--from", tokens, "-i", "0", "-m", tiny_checkpoint, "--out", decoded, "-q").exit_code == 0
        save_checkpoint(tmp_path / "run", tiny_model, step=1, train_state={"x": __import__("torch").zeros(2)})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in (tokens, decoded, run / "config.json", run / "model.safetensors", run / "train_state.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_temp_files_of_a_killed_writer_are_cleaned_on_the_next_write(tmp_path):
    target = tmp_path / "t.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = tmp_path / f".t.safetensors.{dead_pid}.abc123.tmp"  # as a kill -9 mid-write leaves it
    live = tmp_path / f".t.safetensors.{os.getppid()}.xyz789.tmp"  # a running writer's: not ours to delete
    other = tmp_path / ".u.safetensors.1.abc.tmp"  # another file's
    for path in (left, live, other):
        path.write_bytes(b"partial")
    atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not left.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_corrupt_token_dataset_metadata_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"ids": torch.zeros(2, 4, dtype=torch.int16), "labels": torch.zeros(2, dtype=torch.int32)}, path,
              metadata={"lqae_token_dataset": "1", "classes": "[", "paths": "[]", "grid": "[2, 2]", "model_config": "{}"})

    with pytest.raises(DataError, match="broken.safetensors has corrupt metadata"):
        read_token_dataset(path)
    result = invoke("decode", "--from", path, "-m", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert_error(result, "broken.safetensors")


def test_a_folder_is_listed_once_per_process_however_many_files_go_into_it(tmp_path, monkeypatch):
    """Writing N files into one folder (decode to a folder of PNGs) must not list it N times."""
    listed = []
    scandir = io.os.scandir
    monkeypatch.setattr(io.os, "scandir", lambda folder: listed.append(folder) or scandir(folder))
    for i in range(20):
        io.atomic_write_bytes(tmp_path / f"{i:02d}.png", b"png")
    assert len(listed) == 1 and len(list(tmp_path.iterdir())) == 20
