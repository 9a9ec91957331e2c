"""Encoding at scale: worker processes and torchrun ranks give exactly the ids of one process, and
the shards the ranks write read back as one token dataset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lqae.images.source
from conftest import write_class_images
from lqae.checkpoint import load_model
from lqae.errors import DataError
from lqae.images.source import scan_images as scan_image_source
from lqae.tokendata import encode_folder_to_file, read_token_dataset, shard_path, write_token_index
from lqae_cli.app import app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def many_images(tmp_path):
    return write_class_images(tmp_path / "many", classes=("red", "blue", "green"), per_class=7)


def test_workers_give_the_ids_of_the_main_process(tiny_checkpoint, many_images, tmp_path):
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.safetensors"
        result = invoke("encode", many_images, "-m", tiny_checkpoint, "-o", out, "--batch-size", "4",
                        "--workers", workers, "--quiet")
        assert result.exit_code == 0, result.output
        outs[workers] = read_token_dataset(out)
    assert outs[2].ids.tolist() == outs[0].ids.tolist() and outs[2].paths == outs[0].paths
    printed = invoke("encode", many_images, "-m", tiny_checkpoint, "-f", "ids", "--batch-size", "4", "--workers", 2)
    assert printed.exit_code == 0, printed.output
    assert [list(map(int, line.split("\t")[1].split())) for line in printed.stdout.splitlines()] == outs[0].ids.tolist()


def test_an_image_unreadable_in_a_worker_is_skipped_and_named_in_one_line(
    tiny_checkpoint, many_images, tmp_path, monkeypatch
):
    """Inside a folder, an image that fails only when a worker decodes it is skipped and named, as
    without workers (the README's "Reliability"); never a worker's traceback."""
    scan = lqae.images.source.scan_image_folder
    broken = []

    def scan_then_break(*args, **kwargs):  # the file turns bad after the scan, as on a live disk
        found = scan(*args, **kwargs)
        found.paths[5].write_bytes(b"truncated")
        broken.append(str(found.paths[5]))
        return found

    monkeypatch.setattr(lqae.images.source, "scan_image_folder", scan_then_break)
    out = tmp_path / "bad.safetensors"
    result = invoke("encode", many_images, "-m", tiny_checkpoint, "-o", out, "--batch-size", "4", "--workers", 1, "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("WARNING: skipped 1 unreadable image(s): ") and broken[0] in lines[0]
    assert "Traceback" not in result.output
    written = read_token_dataset(out)
    assert len(written) == 20 and broken[0] not in written.paths


def test_ranks_write_shards_and_an_index_that_reads_as_one_dataset(tiny_checkpoint, many_images, tmp_path, monkeypatch):
    """The ranks' work, one after the other in this process (the collectives answered locally):
    the index joins the shards into the single-process dataset, and decode reads it."""
    monkeypatch.setattr("lqae.distributed.any_rank", lambda flag, device: flag)
    model, folder = load_model(tiny_checkpoint, encode_only=True), scan_image_source(many_images)
    single = tmp_path / "single.safetensors"
    encode_folder_to_file(model, folder, single, batch_size=4)
    index = tmp_path / "ranks.safetensors"
    for rank in (2, 1, 0):  # rank 0 last: it writes the index once the shards are there
        summary = encode_folder_to_file(model, folder, index, batch_size=5, rank=rank, world=3)
    assert summary.images == len(folder) == 21
    assert [shard_path(index, r, 3).name for r in range(3)] == [
        f"ranks-0000{r}-of-00003.safetensors" for r in (1, 2, 3)
    ]
    one, joined = read_token_dataset(single), read_token_dataset(index)
    assert joined.ids.tolist() == one.ids.tolist() and joined.labels.tolist() == one.labels.tolist()
    assert joined.paths == one.paths and joined.classes == one.classes and joined.weights == one.weights
    assert len(read_token_dataset(shard_path(index, 1, 3))) == 7

    result = invoke("decode", "--from", index, "--index", 20, "-m", tiny_checkpoint, "--out", tmp_path / "last.png")
    assert result.exit_code == 0, result.output
    shard_path(index, 2, 3).unlink()
    result = invoke("decode", "--from", index, "-m", tiny_checkpoint, "--out", tmp_path / "decoded")
    assert result.exit_code == 1 and "ranks-00003-of-00003.safetensors, which does not exist" in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_encode_shards_that_probe_and_fewshot_read(tiny_checkpoint, many_images, tmp_path):
    """torchrun with 2 CPU processes (gloo): ids identical to one process; probe, fewshot and decode read the index."""
    single, index = tmp_path / "single.safetensors", tmp_path / "index.safetensors"
    assert invoke("encode", many_images, "-m", tiny_checkpoint, "-o", single, "--quiet").exit_code == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lqae_cli",
         "encode", str(many_images), "-m", str(tiny_checkpoint), "-o", str(index), "--batch-size", "4",
         "--workers", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 shards of one dataset" in result.stderr
    assert read_token_dataset(index).ids.tolist() == read_token_dataset(single).ids.tolist()
    assert torch.equal(read_token_dataset(shard_path(index, 1, 2)).ids, read_token_dataset(single).ids[10:])
    probe = invoke("probe", index, "--val", index, "-m", tiny_checkpoint, "--baseline", "none", "--json", "--epochs", "2")
    assert probe.exit_code == 0, probe.output
    fewshot = invoke("fewshot", "--support", index, "--query", index, "-m", tiny_checkpoint, "--llm", "overlap",
                     "--ways", "2", "--shots", "1", "--episodes", "4", "--json")
    assert fewshot.exit_code == 0, fewshot.output
    decoded = invoke("decode", "--from", index, "--index", 0, "-m", tiny_checkpoint, "--out", tmp_path / "zero.png")
    assert decoded.exit_code == 0, decoded.output


def test_an_index_that_names_itself_or_lacks_metadata_is_one_clear_error(tmp_path):
    index = tmp_path / "loop.safetensors"
    index.write_bytes(b"a placeholder the index replaces")
    write_token_index(index, [index], [1], {"lqae_token_dataset": "1", "classes": "[]", "grid": "[4, 4]", "model_config": "{}"})
    with pytest.raises(DataError, match="is an index itself"):
        read_token_dataset(index)
    (tmp_path / "a.safetensors").write_bytes(b"")
    write_token_index(index, [tmp_path / "a.safetensors"], [1], {"lqae_token_dataset": "1"})
    with pytest.raises(DataError, match="corrupt metadata"):
        read_token_dataset(index)
