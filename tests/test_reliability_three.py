"""Reliability, round three (issue 35): no output path that destroys a file, no shard or tar read
half right, no label that forges a line, and one clear line where an internal error showed."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner
from conftest import tiny_model_config, tiny_train_config
from test_fewshot_helpers import WordTokenizer, synthetic_pool
from test_fewshot_openai import SECRET, byte_encoding, request
from test_reliability import assert_one_error_line, invoke
from test_shards import shard as write_shard

from lqae import checkpoint as ckpt
from lqae.run_lock import RunLock
from lqae.errors import CheckpointError, ConfigError, DataError, LLMError, OutputError
from lqae.fewshot.backends.openai import MAX_BACKOFF, OpenAIBackend, _retry_after, continuation_logprob
from lqae.fewshot.backends.overlap import OverlapBackend
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.prompts import load_template
from lqae.fewshot.settings import FewshotSettings
from lqae.fewshot.support import SupportSet
from lqae.hub import card_state, write_card
from lqae.checkpoint import load_model
from lqae.images.shards import scan_shards
from lqae.images.source import scan_images
from lqae.tokendata import read_token_dataset
from lqae.tokendata.encode import encode_folder_to_file
from lqae.tokendata.format import shard_path
from lqae.training import loop as training
from lqae.training import record
from lqae.training import TrainingInterrupted, train
from lqae_cli.app import app


# -- item 1: `fewshot --out` never empties a file that is not this run's results ----------------------


@pytest.mark.parametrize("content", [b'{"keep":1}', b'{"keep": [1, 2', b"notes"])
def test_fewshot_out_keeps_a_file_that_is_not_its_results(image_folder, tiny_checkpoint, tmp_path, content):
    notes = tmp_path / "notes.json"
    notes.write_bytes(content)
    result = invoke("fewshot", "--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint,
                    "--llm", "overlap", "--episodes", "2", "--out", notes)
    assert_one_error_line(result, str(notes))
    assert notes.read_bytes() == content


def test_fewshot_out_still_resumes_past_its_own_cut_line(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "results.jsonl"
    common = ["fewshot", "--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--llm", "overlap",
              "--out", out, "--json"]
    assert invoke(*common, "--episodes", "3").exit_code == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:15])  # killed while writing the third record
    again = invoke(*common, "--episodes", "3")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed"] == 2 and len(out.read_text().splitlines()) == 3
    whole = out.read_bytes()
    out.write_bytes(whole.rstrip(b"\n"))  # its own last record without the line break: kept, not cut
    assert json.loads(invoke(*common, "--episodes", "3").stdout)["resumed"] == 3
    assert out.read_bytes() == whole


# -- item 2: one rule for every file the CLI writes ------------------------------------------------


def test_no_output_option_replaces_the_weights_or_another_file(image_folder, tiny_checkpoint, tmp_path):
    weights = tiny_checkpoint / "model.safetensors"
    before = weights.read_bytes()
    image = next((image_folder / "red").iterdir())
    notes = tmp_path / "notes.png"  # named like a picture, but a text file
    notes.write_text("mine")
    tokens = invoke("encode", image, "-m", tiny_checkpoint, "-f", "tokens").stdout
    for target in (weights, notes):
        assert_one_error_line(invoke("eval", image_folder, "-m", tiny_checkpoint, "--grid-png", target),
                              str(target), "refusing to overwrite")
        assert_one_error_line(invoke("encode", image, "-m", tiny_checkpoint, "--show", target), str(target))
        assert_one_error_line(invoke("decode", "-", "-m", tiny_checkpoint, "--out", target, input=tokens), str(target))
    assert_one_error_line(invoke("decode", "-", "-m", tiny_checkpoint, "--out", notes, input=tokens), "refusing")
    assert weights.read_bytes() == before and notes.read_text() == "mine"
    grid = tmp_path / "grid.png"
    for _ in range(2):  # a PNG it wrote is replaced
        assert invoke("eval", image_folder, "-m", tiny_checkpoint, "--grid-png", grid).exit_code == 0
    assert grid.read_bytes().startswith(b"\x89PNG")


# -- items 5 and 14: the model card ---------------------------------------------------------------


def test_card_never_overwrites_a_readme_someone_wrote_or_edited(tiny_checkpoint):
    readme = tiny_checkpoint / "README.md"
    readme.write_text("# my notes\n")
    with pytest.raises(OutputError, match="not a card `lqae card` wrote"):
        write_card(tiny_checkpoint)
    assert readme.read_text() == "# my notes\n" and card_state(readme) == "other"
    readme.unlink()
    write_card(tiny_checkpoint)
    assert card_state(readme) == "lqae"
    write_card(tiny_checkpoint, "org/name")  # its own card, untouched since: replaced
    readme.write_text(readme.read_text().replace("# ", "# Edited: ", 1))
    assert card_state(readme) == "edited"
    with pytest.raises(OutputError, match="was edited since"):
        write_card(tiny_checkpoint)
    assert readme.read_text().startswith("---") and "# Edited: " in readme.read_text()


@pytest.mark.parametrize("repo", ["org/name\nextra", "org/name@v2", "not an id"])
def test_card_validates_the_repo_as_push_does(tiny_checkpoint, repo):
    with pytest.raises(ConfigError, match="is not a hub repo id"):
        write_card(tiny_checkpoint, repo)
    assert not (tiny_checkpoint / "README.md").exists()


# -- items 3 and 4: a new run claims its folder first, and only a new or empty one -------------------


def test_a_new_run_holds_its_folders_lock_before_it_builds(tiny_lm_dir, image_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []
    build = training._build

    def build_and_look(run_dir, *args, **kwargs):
        seen.append(RunLock(run_dir).acquire(raise_if_held=False))  # another trainer, arriving now
        return build(run_dir, *args, **kwargs)

    monkeypatch.setattr(training, "_build", build_and_look)
    training.train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    assert seen == [False]  # refused: the first trainer claimed the folder before building anything
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):  # checked under the lock
        training.train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))


def test_a_new_run_never_trains_into_a_folder_of_other_files(tiny_lm_dir, image_folder, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.json").write_text('{"my": "data"}')
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(CheckpointError, match="is not empty .*data.json, metrics.jsonl.* a new run needs a new or empty"):
        train(image_folder, folder, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    assert (folder / "data.json").read_text() == '{"my": "data"}' and (folder / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(image_folder, empty, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=1)).step == 1


def test_a_run_that_fails_before_it_begins_leaves_no_folder(tiny_lm_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DataError):
        train(tmp_path / "missing", run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    assert not run.exists()  # the same command can run again once the data is there


# -- item 6: a journal never discards the last copy of anything ---------------------------------------


def test_a_half_moved_journal_that_no_longer_checks_out_is_kept_not_deleted(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=1)
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "roll_forward", lambda run_dir: None)
        ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=2)
    journal = run / ".saving"
    (journal / "model.safetensors").replace(run / "model.safetensors")  # a roll-forward killed after one move
    with open(run / "model.safetensors", "ab") as handle:  # ... and then the moved file was changed
        handle.write(b"\0")
    new_config = (journal / "config.json").read_bytes()  # the only copy of step 2's config
    ckpt.recover(run)
    kept = [p for p in run.iterdir() if p.name.startswith(".saving.unmatched-")]
    assert len(kept) == 1 and (kept[0] / "config.json").read_bytes() == new_config
    assert not journal.exists()


# -- item 7: a sharded token dataset never mixes two encodes --------------------------------------


@pytest.fixture
def two_encodes(tiny_checkpoint, image_folder, tmp_path, monkeypatch):
    """The same folder encoded twice by two 'processes' each (the ranks run one after the other here)."""
    monkeypatch.setattr("lqae.distributed.any_rank", lambda flag, device: flag)
    model, folder = load_model(tiny_checkpoint, encode_only=True), scan_images(image_folder)
    first, second = tmp_path / "first" / "data.safetensors", tmp_path / "second" / "data.safetensors"
    for index in (first, second):
        for rank in (1, 0):
            encode_folder_to_file(model, folder, index, batch_size=4, rank=rank, world=2)
    return first, second


def test_a_shard_of_another_encode_is_refused_by_content(two_encodes):
    first, second = two_encodes
    shard = shard_path(first, 1, 2)
    ids = read_token_dataset(shard_path(second, 1, 2)).ids
    other = edited_dataset(shard_path(second, 1, 2), shard.with_name("other.safetensors"),
                           tensors={"ids": ids.flip(0).to(torch.int16)})  # another encode: same rows, config, weights
    shutil.copy(other, shard)
    with pytest.raises(DataError, match="does not match its index"):
        read_token_dataset(first)


def test_a_rerun_that_fails_on_another_rank_leaves_no_index_over_mixed_shards(
    tiny_checkpoint, image_folder, two_encodes, monkeypatch
):
    first, _ = two_encodes
    model, folder = load_model(tiny_checkpoint, encode_only=True), scan_images(image_folder)
    monkeypatch.setattr("lqae.distributed.any_rank", lambda flag, device: True)  # rank 1 of the rerun died
    with pytest.raises(DataError, match="another encoding process failed"):
        encode_folder_to_file(model, folder, first, batch_size=4, rank=0, world=2)
    assert shard_path(first, 0, 2).exists() and not first.exists()  # no index over its new and old shards
    with pytest.raises(DataError, match="does not exist"):
        read_token_dataset(first)


@pytest.mark.parametrize("names, rows, needle", [
    (["../elsewhere.safetensors"], [6], "is not a file beside the index"),
    (["/abs/x.safetensors"], [6], "is not a file beside the index"),
    (["a.safetensors", "a.safetensors"], [6, 6], "a shard is named twice"),
    (5, [6], "no list of shard names"),
    (["a.safetensors"], None, "no row count for each shard"),
])
def test_an_index_names_only_its_own_shards(tmp_path, names, rows, needle):
    index = tmp_path / "index.safetensors"
    metadata = {"lqae_token_dataset": "1", "classes": "[]", "grid": "[4, 4]", "model_config": "{}",
                "shards": json.dumps(names), "rows": json.dumps(rows)}
    save_file({}, str(index), metadata=metadata)
    with pytest.raises(DataError, match=needle):
        read_token_dataset(index)


# -- items 8, 9 and 10: a tar shard is read whole or not at all ---------------------------------------


def png_bytes(colour=(200, 10, 10), size=32):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_shard_is_an_error_not_fewer_samples(tmp_path, image_folder):
    noise = np.random.default_rng(0).integers(0, 255, (16, 48, 48, 3), dtype=np.uint8)
    samples = []
    for i, pixels in enumerate(noise):  # about 7 KB each: the 20,480-byte cut falls inside the shard
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        samples.append((f"{i:03d}.png", buffer.getvalue()))
    good = write_shard(tmp_path / "good.tar", samples)
    assert len(scan_shards(good)) == 16 and len(good.read_bytes()) > 3 * 20480
    for cut in (20480, 20480 + 512, len(good.read_bytes()) // 2 + 7):
        (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:cut])
        with pytest.raises(DataError, match="cut short or damaged"):
            scan_shards(tmp_path / "cut.tar")
    assert_one_error_line(invoke("eval", tmp_path / "cut.tar", "-m", "no-such-run"), "cut short")


def test_a_key_twice_in_a_shard_is_refused(tmp_path):
    png = png_bytes()
    for samples in ([("a.png", png), ("a.png", png)], [("a.png", png), ("a.jpg", png)],
                    [("a.png", png), ("a.cls", b"cat"), ("a.cls", b"dog")]):
        with pytest.raises(DataError, match="holds sample 'a' twice"):
            scan_shards(write_shard(tmp_path / "dup.tar", samples))


@pytest.mark.parametrize("label, needle", [
    (b"5000000", "indices must be below 1,000,000"),
    (b"99999999999", "indices must be below"),
    (b"  ", "are empty"),
])
def test_junk_cls_labels_are_refused(tmp_path, label, needle):
    png = png_bytes()
    shard = write_shard(tmp_path / "junk.tar", [("a.png", png), ("a.cls", b"1"), ("b.png", png), ("b.cls", label)])
    with pytest.raises(DataError, match=needle):
        scan_shards(shard)


def test_a_unicode_digit_is_a_class_name_not_an_index(tmp_path):
    png = png_bytes()
    shard = write_shard(tmp_path / "digits.tar", [("a.png", png), ("a.cls", "٣".encode()), ("b.png", png), ("b.cls", b"3")])
    found = scan_shards(shard)
    assert found.classes == ["3", "٣"] and len(found.classes) == 2  # two names, not class 3 twice


# -- items 16 and 18: names cannot forge lines or reach the terminal raw -------------------------------


def test_a_class_named_with_a_line_break_is_refused_wherever_classes_are_read(tmp_path, tiny_checkpoint):
    evil = "evil\nred\tforged"
    folder = tmp_path / "images"
    (folder / evil).mkdir(parents=True)
    (folder / evil / "a.png").write_bytes(png_bytes())
    (folder / "cat").mkdir()
    (folder / "cat" / "b.png").write_bytes(png_bytes((10, 200, 10)))
    with pytest.raises(DataError, match="control character"):
        scan_images(folder)
    shard = write_shard(tmp_path / "evil.tar", [("a.png", png_bytes()), ("a.cls", evil.encode()), ("b.png", png_bytes()),
                                                ("b.cls", b"cat")])
    with pytest.raises(DataError, match="control character"):
        scan_shards(shard)
    result = invoke("probe", folder, "--val", folder, "-m", tiny_checkpoint, "--baseline", "none")
    assert_one_error_line(result, "control character")
    assert "\nred" not in result.stderr and "\\nred\\tforged" in result.stderr  # escaped in the message


def test_escape_sequences_in_file_names_never_reach_the_terminal_raw(tmp_path, tiny_checkpoint):
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes())
    (folder / "bad\x1b[31m.png").write_bytes(b"not an image")
    printed = invoke("encode", folder, "-m", tiny_checkpoint, "-f", "ids")
    assert "\x1b" not in printed.stderr and "\\x1b[31m" in printed.stderr  # the skipped file's warning, escaped
    named = tmp_path / "x\x1b]0;title\x07.png"
    named.write_bytes(png_bytes())
    result = invoke("encode", named, folder / "ok.png", "-m", tiny_checkpoint)
    assert_one_error_line(result, "control character", "--format jsonl")
    assert "\x1b" not in result.output


# -- item 13: an edited token dataset is checked alike by every reader ---------------------------------


def edited_dataset(source, target, tensors=None, **metadata):
    """A copy of token dataset `source` with some tensors and metadata fields replaced."""
    with safe_open(str(source), framework="pt") as handle:
        meta = dict(handle.metadata())
        data = {k: handle.get_tensor(k) for k in handle.keys()}
    data.update(tensors or {})
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    save_file(data, str(target), metadata=meta)
    return target


@pytest.mark.parametrize("edit, needle", [
    (dict(tensors={"labels": torch.full((12,), 99, dtype=torch.int64)}), "a label outside the 2 classes"),
    (dict(tensors={"ids": torch.full((12, 16), 70000, dtype=torch.int32)}), "an id outside the LM's vocabulary"),
    (dict(classes=["blue", "blue"]), "names a class twice"),
    (dict(paths="all of them"), "paths are not a list of strings"),
])
def test_every_reader_refuses_an_edited_token_dataset(image_folder, tiny_checkpoint, tmp_path, edit, needle):
    good = tmp_path / "good.safetensors"
    assert invoke("encode", image_folder, "-m", tiny_checkpoint, "--out", good, "--quiet").exit_code == 0
    bad = edited_dataset(good, tmp_path / "bad.safetensors", **edit)
    for command in (
        ["probe", bad, "--val", good, "-m", tiny_checkpoint, "--baseline", "none"],
        ["fewshot", "--support", bad, "--query", good, "-m", tiny_checkpoint, "--llm", "overlap", "--episodes", "2"],
        ["decode", "--from", bad, "--index", "0", "-m", tiny_checkpoint, "--out", tmp_path / "x.png"],
    ):
        assert_one_error_line(invoke(*command), "bad.safetensors", needle)


# -- items 11, 15, 17, 19, 20: the LLM server's answers and addresses --------------------------------


def completion(values, full="Q: x\nA: cat dog", start=8):
    """A /v1/completions reply echoing `full` as single-character tokens with these log-probs."""
    tokens = list(full)
    logprobs = [None] + [-0.5] * (len(tokens) - 1)
    for i, value in enumerate(values):
        logprobs[start + i] = value
    return {"choices": [{"logprobs": {"token_logprobs": logprobs, "tokens": tokens,
                                      "text_offset": list(range(len(tokens)))}}]}


@pytest.mark.parametrize("values", [[-1e308] * 7, [0.5] * 7, [float("-inf")] * 7])
def test_log_probs_that_are_not_finite_numbers_at_most_zero_are_refused(values):
    with pytest.raises(LLMError, match="not finite numbers of at most 0"):
        continuation_logprob(completion(values), "Q: x\nA: cat dog", 8)
    assert continuation_logprob(completion([-1.0] * 7), "Q: x\nA: cat dog", 8) == (-7.0, 7)


def test_calibration_never_picks_a_label_from_scores_that_are_not_finite(image_folder, tiny_checkpoint):
    class Underflow(OverlapBackend):
        name, reads_text = "underflow", True

        def loglik(self, request):
            return [[(float("-inf"), 1)] * len(request.labels) for _ in request.prompts]

        def count(self, prompt):
            return 1

        def count_text(self, text):
            return 1

    pool = synthetic_pool()
    support_set = SupportSet(Underflow(), load_template("completion"), FewshotSettings(ways=2, shots=1),
                             PromptImageText(WordTokenizer()), pool, [0, 2], ["a", "b"], [0, 1], [pool.ids[1]], 1)
    with pytest.raises(LLMError, match="not finite"):
        support_set.answer([pool.ids[1]])


def test_a_url_where_the_model_name_goes_is_refused_before_any_request(image_folder, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = invoke("fewshot", "--support", image_folder, next((image_folder / "red").iterdir()), "-m", tiny_checkpoint,
                    "--llm", "openai:http://localhost:8000/v1")
    assert_one_error_line(result, "names a server where the model name goes", "--api-base")


def test_the_key_never_shows_in_any_letter_case_or_split_and_urls_lose_their_password():
    backend = OpenAIBackend("m", api_base="http://user:pass@127.0.0.1:9/v1", api_key="sk-AbCdEf123456", encoding=byte_encoding())
    reply = "echo: SK-ABCDEF123456 and sk-AbCd\nEf123456 from http://bob:hunter2@proxy:3128/x"
    shown = backend._excerpt(reply)
    assert "abcdef" not in shown.lower() and "hunter2" not in shown and shown.count("***") == 3
    assert "user:pass" not in repr(backend) and backend.shown_base == "http://***@127.0.0.1:9/v1"
    with pytest.raises(LLMError) as failure:
        OpenAIBackend("m", api_base="http://user:pass@127.0.0.1:9/v1", retries=0, timeout=0.5,
                      encoding=byte_encoding()).loglik(request())
    assert "user:pass" not in str(failure.value) and "***@127.0.0.1" in str(failure.value)


@pytest.mark.parametrize("timeout", [-1, float("nan"), 0])
def test_a_timeout_that_is_not_a_positive_number_is_one_line(timeout):
    with pytest.raises(ConfigError, match="--timeout must be a positive number of seconds"):
        OpenAIBackend("m", timeout=timeout, encoding=byte_encoding())


def test_retry_after_nan_and_the_back_off_are_bounded(monkeypatch):
    assert _retry_after({"Retry-After": "nan"}, 2.0) == 2.0
    assert _retry_after({"Retry-After": "inf"}, 2.0) == 2.0
    assert _retry_after({"Retry-After": "1e9"}, 2.0) == MAX_BACKOFF
    slept = []
    monkeypatch.setattr("lqae.fewshot.backends.openai.time.sleep", slept.append)
    with pytest.raises(LLMError, match="after 21 tries"):
        OpenAIBackend("m", api_base="http://127.0.0.1:9/v1", retries=20, timeout=0.5,
                      encoding=byte_encoding()).loglik(request())
    assert max(slept) == MAX_BACKOFF and sum(slept) < 20 * MAX_BACKOFF


# -- item 19: one clear line instead of an internal error ---------------------------------------------


def test_invalid_utf8_token_text_is_one_line(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["decode", "-", "-m", str(tiny_checkpoint), "--out", str(tmp_path / "x.png")],
                           input=b"\xff\xfe kobali\n")
    assert_one_error_line(result, "not UTF-8 text")
    assert not (tmp_path / "x.png").exists()


def test_a_full_disk_during_fewshot_out_names_the_file_and_keeps_its_records(image_folder, tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "results.jsonl"
    common = ["fewshot", "--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--llm", "overlap",
              "--out", out]
    assert invoke(*common, "--episodes", "2").exit_code == 0
    before = out.read_bytes()
    monkeypatch.setattr("lqae.fewshot.results.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert_one_error_line(invoke(*common, "--episodes", "4"), f"cannot write {out}", "No space left")
    assert out.read_bytes().startswith(before)


# -- item 12: --resume on replaced images of the same names and sizes ---------------------------------


def test_resume_refuses_an_image_replaced_by_one_of_the_same_name_and_size(tiny_lm_dir, tmp_path):
    folder = tmp_path / "bitmaps"  # BMP files of one size: a replacement keeps name and size exactly
    for c, name in enumerate(("red", "blue")):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (200 * (1 - c), 20 * i, 200 * c)).save(folder / name / f"{i}.bmp")
    run = tmp_path / "run"
    train(folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    assert "content_sha256" in json.loads((run / "data.json").read_text())["train"]
    replaced = folder / "blue" / "3.bmp"
    size = replaced.stat().st_size
    Image.new("RGB", (16, 16), (9, 99, 199)).save(replaced)
    assert replaced.stat().st_size == size
    with pytest.raises(DataError, match="the content of its images"):
        train(folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3), resume=True)


def test_a_large_sets_resume_compares_modification_times(tiny_lm_dir, image_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(record, "CONTENT_LIMIT", 0)
    monkeypatch.setattr(record, "TIME_CHUNK", 4)
    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    assert len(json.loads((run / "data.json").read_text())["train"]["mtime_chunks"]) == 3
    images = sorted(p for p in image_folder.rglob("*.png"))
    for path in images:  # every time changed at once: a copy of the folder
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with caplog.at_level("WARNING", logger="lqae"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3), resume=True)
    assert "as a copy of the folder does" in caplog.text
    os.utime(images[5], ns=(images[5].stat().st_atime_ns, images[5].stat().st_mtime_ns + 10**9))  # one image replaced
    with pytest.raises(DataError, match="images 4 to 7"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4), resume=True)


# -- item 20: advice that works, and a prompt stop --------------------------------------------------


def test_resume_takes_the_changes_the_divergence_error_advises(tiny_lm_dir, image_folder, tmp_path):
    """The NaN error says: continue with --resume and a lower --lr, --set grad_clip=1.0 or --precision
    fp32; each of them is accepted by --resume (and recorded), the rest of the configuration still not."""
    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    changed = tiny_train_config(steps=4, base_lr=1e-4, grad_clip=1.0, precision="fp32")
    result = train(image_folder, run, tiny_model_config(tiny_lm_dir), changed, resume=True)
    saved = ckpt.read_config(run)[1]
    assert result.step == 4 and (saved.base_lr, saved.grad_clip, saved.precision) == (1e-4, 1.0, "fp32")
    with pytest.raises(ConfigError, match="weight_decay"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=5, weight_decay=0.3), resume=True)


def test_a_signal_during_the_last_validation_stops_at_once_keeping_the_checkpoint(
    tiny_lm_dir, image_folder, tmp_path, monkeypatch
):
    def slow_validation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a long pass: the signal must cut it
        raise AssertionError("validation ran to its end")

    monkeypatch.setattr(training, "evaluate_reconstruction", slow_validation)
    started = time.monotonic()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2), val_dir=image_folder)
    assert time.monotonic() - started < 30 and stopped.value.signum == signal.SIGTERM
    assert ckpt.read_config(tmp_path / "run")[2] == 2  # the last step's checkpoint, saved before the pass


def test_a_signal_during_a_sample_grid_saves_the_step_first(tiny_lm_dir, image_folder, tmp_path, monkeypatch):
    def slow_samples(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

    monkeypatch.setattr(training.parts, "save_samples", slow_samples)
    with pytest.raises(TrainingInterrupted):
        train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir),
              tiny_train_config(steps=6, sample_every=3, save_every=100))
    assert ckpt.read_config(tmp_path / "run")[2] == 3  # no save was due at step 3: one was made before stopping


def test_a_saved_probe_with_a_forged_class_name_is_refused_before_printing(image_folder, tiny_checkpoint, tmp_path):
    probe = tmp_path / "probe"
    saved = invoke("probe", image_folder, "--val", image_folder, "-m", tiny_checkpoint, "--save", probe,
                   "--baseline", "none", "--epochs", "1")
    assert saved.exit_code == 0, saved.output
    meta = json.loads((probe / "probe.json").read_text())
    meta["classes"][0] = "blue\n/etc/passwd\tforged"
    (probe / "probe.json").write_text(json.dumps(meta))
    result = invoke("probe", "--apply", probe, next((image_folder / "red").iterdir()), "-m", tiny_checkpoint)
    assert_one_error_line(result, "control character")
    assert result.stdout == ""
