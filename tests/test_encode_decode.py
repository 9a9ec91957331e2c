"""`lqae encode` / `lqae decode`: round trips, token datasets, piping, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import tiny_model_config, tiny_train_config
from lqae.checkpoint import load_model, save_checkpoint
from lqae.config import to_dict
from lqae.images.files import load_image, scan_image_folder, to_pil
from lqae.model import LQAE
from lqae.reconstruction import evaluate_reconstruction
from lqae.tokendata import TokenDataset, TokenDatasetWriter, encode_folder, read_token_dataset, write_token_dataset
from lqae.tokentext import TokenText
from lqae_cli.app import app

REPO = Path(__file__).resolve().parents[1]
LENGTH = 16  # tokens per image of the tiny config: (16 px / 4 px patches)^2


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture
def image(image_folder) -> Path:
    return image_folder / "red" / "red_001.png"


def invoke(runner: CliRunner, *args, input: str | None = None, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def expected_reconstruction(model, path: Path) -> np.ndarray:
    """What the model's own encode -> decode gives for an image file, as 8-bit pixels."""
    image = load_image(path, model.config.image_size).unsqueeze(0)
    return np.asarray(to_pil(model.reconstruct(image)[0]))


def assert_one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the token text codec ----------------------------------------------------------------------


def test_every_written_form_reads_back_to_the_same_ids(model):
    token_text = TokenText.for_model(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        codes = torch.randint(0, model.codebook.size, (LENGTH,), generator=generator)
        ids = model.codebook.code_to_token[codes].tolist()
        assert token_text.parse(token_text.render(ids, "tokens"), "tokens") == ids
        assert token_text.parse(token_text.render(ids, "tokens")) == ids
        assert token_text.parse(token_text.render(ids, "ids"), "ids") == ids
        assert token_text.parse(token_text.render(ids, "text"), "text") == ids  # whole-word vocabulary
        assert token_text.parse(token_text.render(ids, "text").upper()) == ids  # the tokenizer lowercases
        record = json.loads(token_text.render(ids, "jsonl", path="x.png"))
        assert record == {
            "path": "x.png", "ids": ids, "tokens": token_text.tokens(ids), "text": token_text.text(ids), "grid": [4, 4],
        }


def test_parse_lines_reads_what_encode_prints_for_several_images(model):
    token_text = TokenText.for_model(model)
    ids = model.codebook.code_to_token[:LENGTH].tolist()
    other = model.codebook.code_to_token[LENGTH : 2 * LENGTH].tolist()
    text = (
        f"a/b.png\t{token_text.render(ids, 'tokens')}\n\n"
        f"{token_text.render(other, 'text')}\n"
        f"{token_text.render(ids, 'jsonl', path='c.png')}\n"
    )
    lines = token_text.parse_lines(text)
    read = [(line.path, line.ids, line.line) for line in lines]
    assert read == [("a/b.png", ids, 1), (None, other, 3), ("c.png", ids, 4)]


# -- encode ------------------------------------------------------------------------------------


def test_encode_one_image_prints_only_its_token_text(runner, tiny_checkpoint, image, model):
    result = invoke(runner, "encode", image, "--model", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "\t" not in lines[0]

    ids = model.encode(load_image(image, 16).unsqueeze(0))[0].tolist()
    assert lines[0] == TokenText.for_model(model).text(ids)
    assert len(lines[0].split()) == LENGTH


@pytest.mark.parametrize("form", ["tokens", "ids", "jsonl"])
def test_encode_formats(runner, tiny_checkpoint, image, model, form):
    ids = model.encode(load_image(image, 16).unsqueeze(0))[0].tolist()
    result = invoke(runner, "encode", image, "-m", tiny_checkpoint, "--format", form)
    assert result.exit_code == 0, result.output
    line = result.stdout.rstrip("\n")
    assert "\n" not in line
    if form == "tokens":
        assert line == " ".join(model.tokenizer.convert_ids_to_tokens(ids))
    elif form == "ids":
        assert line == " ".join(map(str, ids))
    else:
        record = json.loads(line)
        assert record["path"] == str(image) and record["ids"] == ids and record["grid"] == [4, 4]
        assert record["tokens"] == model.tokenizer.convert_ids_to_tokens(ids) and record["text"]


def test_encode_several_images_and_folders_prints_path_tab_text_in_order(runner, tiny_checkpoint, image_folder):
    single = invoke(runner, "encode", image_folder / "blue" / "blue_002.png", "-m", tiny_checkpoint, "-f", "tokens")
    files = invoke(
        runner, "encode", image_folder / "red" / "red_003.png", image_folder / "blue" / "blue_002.png",
        "-m", tiny_checkpoint, "-f", "tokens",
    )
    folder = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "-f", "tokens", "--batch-size", "5")
    assert single.exit_code == files.exit_code == folder.exit_code == 0, folder.output
    paths = [line.split("\t")[0] for line in files.stdout.splitlines()]
    assert paths == [str(image_folder / "red" / "red_003.png"), str(image_folder / "blue" / "blue_002.png")]
    rows = dict(line.split("\t") for line in folder.stdout.splitlines())
    expected = sorted(str(p) for p in image_folder.rglob("*.png"))
    assert list(rows) == expected  # recursive, sorted
    # Deterministic whatever the batch: alone, with one other image, or in batches of 5.
    assert rows[paths[1]] == files.stdout.splitlines()[1].split("\t")[1] == single.stdout.strip()


def test_encode_several_images_as_jsonl_gives_one_json_object_per_line(runner, tiny_checkpoint, image_folder):
    result = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == sorted(str(p) for p in image_folder.rglob("*.png"))
    assert all(len(r["ids"]) == LENGTH for r in records)


def test_file_names_with_a_tab_or_newline_are_refused_in_path_tab_lines(runner, tiny_checkpoint, image, tmp_path):
    odd = tmp_path / "odd\tname.png"
    odd.write_bytes(image.read_bytes())
    result = invoke(runner, "encode", image, odd, "-m", tiny_checkpoint)
    assert_one_error_line(result, "tab, line break", "--format jsonl")
    assert result.stdout == ""
    safe = invoke(runner, "encode", image, odd, "-m", tiny_checkpoint, "-f", "jsonl")
    assert safe.exit_code == 0, safe.output
    assert [json.loads(line)["path"] for line in safe.stdout.splitlines()] == [str(image), str(odd)]


def test_encode_model_defaults_to_the_environment(runner, tiny_checkpoint, image):
    result = invoke(runner, "encode", image, env={"LQAE_MODEL": str(tiny_checkpoint)})
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == LENGTH
    missing = invoke(runner, "encode", image, env={"LQAE_MODEL": None})
    assert_one_error_line(missing, "--model", "LQAE_MODEL")


def test_encode_grid_lays_tokens_out_as_the_patch_grid(runner, tiny_checkpoint, image, model):
    tokens = invoke(runner, "encode", image, "-m", tiny_checkpoint, "-f", "tokens").stdout.split()
    result = invoke(runner, "encode", image, "-m", tiny_checkpoint, "--grid")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 4
    cells = [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]
    assert [cell for row in cells for cell in row] == tokens


# -- decode and the round trips ----------------------------------------------------------------


def test_tokens_round_trip_reproduces_the_models_reconstruction(runner, tiny_checkpoint, image, model, tmp_path):
    tokens = invoke(runner, "encode", image, "-m", tiny_checkpoint, "-f", "tokens").stdout
    out = tmp_path / "back.png"
    result = invoke(runner, "decode", "-m", tiny_checkpoint, "--out", out, input=tokens)  # stdin
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    decoded = pixels(out)
    assert decoded.shape == (16, 16, 3)  # the model's resolution, not the source's 20 px
    np.testing.assert_array_equal(decoded, expected_reconstruction(model, image))


@pytest.mark.parametrize("form", ["ids", "text", "jsonl"])
def test_other_forms_round_trip_to_the_same_image(runner, tiny_checkpoint, image, model, tmp_path, form):
    printed = invoke(runner, "encode", image, "-m", tiny_checkpoint, "-f", form).stdout
    out = tmp_path / "back.png"
    flags = ["--ids"] if form == "ids" else []
    if form == "jsonl":
        result = invoke(runner, "decode", "-", "-m", tiny_checkpoint, "--out", out, input=printed)
    else:
        result = invoke(runner, "decode", printed.strip(), "-m", tiny_checkpoint, "--out", out, *flags)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(out), expected_reconstruction(model, image))


def test_several_lines_on_stdin_decode_into_a_folder(runner, tiny_checkpoint, image_folder, model, tmp_path):
    printed = invoke(runner, "encode", image_folder / "red", "-m", tiny_checkpoint, "-f", "tokens").stdout
    out = tmp_path / "decoded"
    result = invoke(runner, "decode", "-m", tiny_checkpoint, "--out", out, input=printed)
    assert result.exit_code == 0, result.output
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [f"{i:05d}_red_{i:03d}.png" for i in range(6)]
    expected = expected_reconstruction(model, image_folder / "red" / "red_004.png")
    np.testing.assert_array_equal(pixels(written[4]), expected)


def test_shell_pipe_encode_into_decode(tiny_checkpoint, image, model, tmp_path):
    out = tmp_path / "piped.png"
    python = f"{sys.executable} -m lqae_cli"
    command = f"{python} encode '{image}' -f tokens | {python} decode -o '{out}'"  # model from LQAE_MODEL
    env = {**os.environ, "PYTHONPATH": str(REPO), "LQAE_MODEL": str(tiny_checkpoint)}
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    np.testing.assert_array_equal(pixels(out), expected_reconstruction(model, image))


def _good_tokens(model) -> list[str]:
    return model.tokenizer.convert_ids_to_tokens(model.codebook.code_to_token[:LENGTH].tolist())


@pytest.mark.parametrize(
    "make_input, flags, needles",
    [
        (lambda t: " ".join(t[:-1]), [], ["got 15 tokens", "16 tokens"]),
        (lambda t: " ".join(t + t[:1]), [], ["got 17 tokens", "16 tokens"]),
        (lambda t: " ".join(t[:-1] + ["zzzz"]), [], ["unknown token 'zzzz'", "16 tokens"]),
        (lambda t: " ".join(t[:-1] + ["zzzz"]), ["--text"], ["re-tokenise", "16 tokens"]),
        (lambda t: " ".join(t[:-1] + ["[CLS]"]), [], ["'[CLS]'", "not a code", "16 tokens"]),
        (lambda t: " ".join(t[:-1] + ["##ba"]), [], ["'##ba'", "not a code", "16 tokens"]),
        (lambda t: " ".join(t[:-2] + [t[-2] + t[-1]]), [], ["splits into", "16 tokens"]),
        (lambda t: " ".join(["2"] * 16), ["--ids"], ["id 2 ('[CLS]')", "not a code", "16 tokens"]),
        (lambda t: " ".join(["9999"] * 16), ["--ids"], ["unknown id 9999", "16 tokens"]),
        (lambda t: " ".join(["x"] * 16), ["--ids"], ["not an integer id", "16 tokens"]),
        (lambda t: "  \n", [], ["no tokens given", "16 tokens"]),
    ],
    ids=["short", "long", "unknown", "text-unknown", "special", "subword", "merged-text", "id-not-code",
         "id-out-of-range", "id-not-int", "empty"],
)
def test_decode_bad_input_is_one_error_line_and_writes_nothing(
    runner, tiny_checkpoint, model, tmp_path, make_input, flags, needles
):
    work = tmp_path / "work"
    work.mkdir()
    bad = make_input(_good_tokens(model))
    result = invoke(runner, "decode", "-m", tiny_checkpoint, "--out", work / "never.png", *flags, input=bad)
    assert_one_error_line(result, *needles)
    assert list(work.iterdir()) == []


def test_decode_one_bad_line_among_several_writes_nothing(runner, tiny_checkpoint, model, tmp_path):
    good = " ".join(_good_tokens(model))
    out = tmp_path / "decoded"
    result = invoke(runner, "decode", "-m", tiny_checkpoint, "--out", out, input=f"{good}\n{good} {good.split()[0]}\n")
    assert_one_error_line(result, "line 2", "got 17 tokens")
    assert not out.exists()


def test_decode_usage_errors(runner, tiny_checkpoint, model, tmp_path):
    good = " ".join(_good_tokens(model))
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    assert_one_error_line(invoke(runner, "decode", good, "-m", tiny_checkpoint), "--out")
    assert_one_error_line(invoke(runner, "decode", good, "-m", tiny_checkpoint, "-o", tmp_path / "x.jpg"), ".png")
    both = invoke(runner, "decode", good, "-m", tiny_checkpoint, "-o", tmp_path / "x.png", "--ids", "--text")
    assert_one_error_line(both, "--ids", "--text")
    assert_one_error_line(invoke(runner, "decode", good, "-m", tmp_path / "nope", "-o", tmp_path / "x.png"), "nope")
    assert list(tmp_path.iterdir()) == []


# -- token datasets ----------------------------------------------------------------------------


def test_token_dataset_file_holds_what_encoding_gives(runner, tiny_checkpoint, image_folder, model, tmp_path):
    out = tmp_path / "tokens.safetensors"
    result = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "--out", out, "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "24x smaller" in result.stderr  # 16x16x3 bytes of pixels vs 16 int16 ids
    dataset = read_token_dataset(out)
    reference = encode_folder(model, scan_image_folder(image_folder))
    assert dataset.ids.tolist() == reference.ids.tolist()
    assert dataset.labels.tolist() == reference.labels.tolist() == [0] * 6 + [1] * 6  # classes sorted: blue, red
    assert dataset.classes == ["blue", "red"]
    assert dataset.paths == reference.paths
    assert dataset.grid == (4, 4)
    assert dataset.model_config == to_dict(model.config)

    with safe_open(str(out), framework="pt") as handle:
        assert str(handle.get_slice("ids").get_dtype()) == "I16"  # compact: the tiny LM has 169 ids


def test_streaming_writer_matches_write_token_dataset(model, tmp_path):
    ids = model.codebook.code_to_token[torch.randint(0, model.codebook.size, (7, LENGTH))]
    labels, classes, paths = [0, 1, -1, 0, 1, 1, 0], ["a", "b"], [f"{i}.png" for i in range(7)]
    dataset = TokenDataset(ids, torch.tensor(labels), classes, paths, to_dict(model.config), (4, 4))
    write_token_dataset(tmp_path / "whole.safetensors", dataset)

    def writer(name: str) -> TokenDatasetWriter:
        return TokenDatasetWriter(tmp_path / name, labels, LENGTH, classes, paths, dataset.model_config, (4, 4))

    with writer("streamed.safetensors") as streaming:
        for start in range(0, 7, 3):
            streaming.write(ids[start : start + 3])
    whole = read_token_dataset(tmp_path / "whole.safetensors")
    streamed = read_token_dataset(tmp_path / "streamed.safetensors")
    assert streamed.ids.tolist() == whole.ids.tolist() == ids.tolist()
    assert streamed.labels.tolist() == whole.labels.tolist()
    assert (streamed.classes, streamed.paths, streamed.grid, streamed.model_config) == (
        whole.classes, whole.paths, whole.grid, whole.model_config
    )
    # An interrupted write leaves neither the file nor its temp file behind.
    with pytest.raises(Exception, match="only 3 of 7 rows"):
        with writer("cut.safetensors") as streaming:
            streaming.write(ids[:3])
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "run")
    assert written == ["streamed.safetensors", "whole.safetensors"]


def test_decode_from_a_token_dataset(runner, tiny_checkpoint, image_folder, model, tmp_path):
    tokens = tmp_path / "tokens.safetensors"
    assert invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "-o", tokens).exit_code == 0
    one = tmp_path / "one.png"
    result = invoke(runner, "decode", "--from", tokens, "--index", "7", "-m", tiny_checkpoint, "-o", one)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(one), expected_reconstruction(model, image_folder / "red" / "red_001.png"))
    folder = tmp_path / "several"
    result = invoke(runner, "decode", "--from", tokens, "-i", "0", "-i", "11", "-m", tiny_checkpoint, "-o", folder)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["00000_blue_000.png", "00011_red_005.png"]
    np.testing.assert_array_equal(
        pixels(folder / "00011_red_005.png"), expected_reconstruction(model, image_folder / "red" / "red_005.png")
    )
    bad = invoke(runner, "decode", "--from", tokens, "-i", "12", "-m", tiny_checkpoint, "-o", tmp_path / "x.png")
    assert_one_error_line(bad, "index 12", "12 entries")
    assert not (tmp_path / "x.png").exists()


def test_decode_from_a_dataset_of_another_sequence_length_fails(
    runner, tiny_lm_dir, image_folder, tmp_path, tiny_checkpoint
):
    torch.manual_seed(0)
    other = tmp_path / "other"
    save_checkpoint(other, LQAE(tiny_model_config(tiny_lm_dir, patch_size=8)), tiny_train_config())  # 4 tokens
    tokens = tmp_path / "tokens.safetensors"
    assert invoke(runner, "encode", image_folder, "-m", other, "-o", tokens).exit_code == 0
    result = invoke(runner, "decode", "--from", tokens, "-i", "0", "-m", tiny_checkpoint, "-o", tmp_path / "x.png")
    assert_one_error_line(result, "4 tokens per image", "expects 16")
    assert not (tmp_path / "x.png").exists()


def test_encode_bad_input_is_one_error_line_and_writes_nothing(runner, tiny_checkpoint, image_folder, image, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    out = tmp_path / "tokens.safetensors"
    assert_one_error_line(invoke(runner, "encode", tmp_path / "missing.png", "-m", tiny_checkpoint), "does not exist")
    result = invoke(runner, "encode", image, corrupt, "-m", tiny_checkpoint)
    assert_one_error_line(result, "corrupt.png")
    assert result.stdout == ""  # checked before the first line is printed
    assert_one_error_line(invoke(runner, "encode", image, "-m", tmp_path / "nope"), "nope")
    assert_one_error_line(invoke(runner, "encode", image, "-m", tiny_checkpoint, "-o", out), "one folder")
    wrong_suffix = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "-o", tmp_path / "t.bin")
    assert_one_error_line(wrong_suffix, ".safetensors")
    assert_one_error_line(invoke(runner, "encode", "-m", tiny_checkpoint), "no images")
    assert_one_error_line(invoke(runner, "encode", image, "-m", tiny_checkpoint, "--grid", "-f", "jsonl"), "--grid")
    assert not out.exists()


def test_encode_a_folder_with_a_corrupt_file_skips_it(runner, tiny_checkpoint, image_folder, tmp_path):
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    result = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "-f", "ids")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 12


# -- reconstruction quality --------------------------------------------------------------------


def test_eval_reports_quality_and_writes_a_grid(runner, tiny_checkpoint, image_folder, model, tmp_path):
    grid = tmp_path / "grid.png"
    result = invoke(runner, "eval", image_folder, "-m", tiny_checkpoint, "--grid-png", grid, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reference, _, _ = evaluate_reconstruction(model, scan_image_folder(image_folder))
    assert report["images"] == 12 and report["tokens_per_image"] == LENGTH
    assert report["psnr"] == pytest.approx(reference.psnr) and report["ssim"] == pytest.approx(reference.ssim)
    assert 1 <= report["unique_codes"] <= report["codebook_size"] == model.codebook.size
    assert 1 <= report["code_perplexity"] <= report["unique_codes"]
    assert report["text_tokens_per_image"] == LENGTH  # whole-word vocabulary: text re-reads as 16 tokens
    # 12 images, 8 per row: originals over reconstructions -> 4 rows of (16 + 2*2 pad) px, x8 upscale.
    assert Image.open(grid).size == (8 * 20 * 8, 4 * 20 * 8)
    table = invoke(runner, "eval", image_folder, "-m", tiny_checkpoint)
    for label in ("PSNR", "SSIM", "unique codes", "code perplexity", "LM tokens per image"):
        assert label in table.stdout


def test_eval_writes_a_png_only_when_asked_and_encode_eval_still_works(
    runner, tiny_checkpoint, image_folder, tmp_path, monkeypatch
):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    plain = invoke(runner, "eval", image_folder, "-m", tiny_checkpoint, "--json")
    assert plain.exit_code == 0, plain.output
    assert list(here.iterdir()) == [] and "grid_png" not in json.loads(plain.stdout)
    old = invoke(runner, "encode", "--eval", image_folder, "-m", tiny_checkpoint, "-f", "jsonl")
    assert old.exit_code == 0, old.output
    assert "deprecated; use `lqae eval" in old.stderr
    assert json.loads(old.stdout) == json.loads(plain.stdout)  # the same report as `lqae eval`
    assert list(here.iterdir()) == []  # no reconstructions.png dropped unasked any more
    misplaced = invoke(runner, "encode", image_folder, "-m", tiny_checkpoint, "--grid-png", tmp_path / "g.png")
    assert misplaced.exit_code != 0 and "lqae eval" in misplaced.stderr
