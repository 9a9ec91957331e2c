"""`lqae fewshot` end to end: script-friendly stdout, evaluation output, resume, token datasets, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lqae.checkpoint import load_model
from lqae.images.files import scan_image_folder
from lqae.tokendata import encode_folder, write_token_dataset
from lqae_cli.app import app
from test_fewshot_helpers import StubServer, one_thread, write_tiny_gpt2

ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    # the `lqae` script lives beside this interpreter, whether or not its venv is activated
    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    with one_thread():
        return write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), label="blue")


def invoke(*args):
    result = CliRunner().invoke(app, ["fewshot", *map(str, args)])
    return result


def first_image(folder: Path, name: str) -> Path:
    return sorted((folder / name).glob("*.png"))[0]


def test_one_query_prints_just_the_label(image_folder, tiny_checkpoint):
    result = invoke("--support", image_folder, first_image(image_folder, "red"), "--model", tiny_checkpoint, "--llm", "overlap")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() in {"red", "blue"} and result.stdout.count("\n") == 1
    assert "error" not in result.stderr


def test_several_queries_print_path_tab_label(image_folder, tiny_checkpoint):
    queries = [first_image(image_folder, "red"), first_image(image_folder, "blue")]
    result = invoke("--support", image_folder, *queries, "--model", tiny_checkpoint, "--llm", "overlap", "--shots", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(q) for q in queries]
    assert all(line.split("\t")[1] in {"red", "blue"} for line in lines)


def test_a_query_name_with_a_tab_is_refused_in_path_tab_lines_but_fine_in_json(image_folder, tiny_checkpoint, tmp_path):
    odd = tmp_path / "odd\tquery.png"
    odd.write_bytes(first_image(image_folder, "red").read_bytes())
    queries = [first_image(image_folder, "blue"), odd]
    result = invoke("--support", image_folder, *queries, "--model", tiny_checkpoint, "--llm", "overlap")
    assert result.exit_code == 1 and result.stdout == ""
    assert "tab, line break" in result.stderr and "--json" in result.stderr
    safe = invoke("--support", image_folder, *queries, "--model", tiny_checkpoint, "--llm", "overlap", "--json")
    assert safe.exit_code == 0, safe.stderr
    assert [p["path"] for p in json.loads(safe.stdout)["predictions"]] == [str(q) for q in queries]


def test_script_usage_in_a_shell(image_folder, tiny_checkpoint):
    query = first_image(image_folder, "blue")
    script = f'label=$(lqae fewshot --support "{image_folder}" "{query}" --model "{tiny_checkpoint}" --llm overlap) && echo "[$label]"'
    output = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() in {"[red]", "[blue]"}


def test_evaluation_json_is_one_object(image_folder, tiny_checkpoint):
    result = invoke("--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint, "--llm", "overlap",
                    "--ways", 2, "--shots", 1, "--episodes", 20, "--seed", 0, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("accuracy", "interval", "episodes", "ways", "shots", "mean_prompt_tokens", "dropped", "chance"):
        assert key in summary
    assert summary["episodes"] == 20 and summary["ways"] == 2 and summary["chance"] == 0.5
    assert summary["interval"][0] <= summary["accuracy"] <= summary["interval"][1]
    diagnostics = summary["diagnostics"]
    assert sum(diagnostics["predicted"].values()) == pytest.approx(1.0)
    assert set(diagnostics["accuracy_by_label_position"]) == {"0", "1"}
    assert "answers:" not in result.stderr  # --json: the figures are in the object, stderr stays quiet
    again = invoke("--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint, "--llm", "overlap",
                   "--ways", 2, "--episodes", 20, "--seed", 0, "--json")
    assert json.loads(again.stdout)["accuracy"] == summary["accuracy"]  # deterministic under --seed


def test_evaluation_text_and_resume(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "results.jsonl"
    common = ["--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint, "--llm", "overlap",
              "--ways", 2, "--out", out]
    first = invoke(*common, "--episodes", 6)
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith("accuracy ") and "over 6 episodes, 2-way 1-shot; chance 50.0%" in first.stdout
    assert len(out.read_text().splitlines()) == 6
    second = invoke(*common, "--episodes", 10, "--json")
    assert json.loads(second.stdout)["resumed"] == 6 and len(out.read_text().splitlines()) == 10
    assert "read back from" in second.stderr
    assert "answers:" in first.stderr and "accuracy by the right label's place" in first.stderr
    changed = invoke(*common, "--episodes", 10, "--seed", 1)
    assert changed.exit_code != 0 and "other settings" in changed.stderr and changed.stdout == ""


def test_protocol_options_that_need_an_llm_are_refused_for_overlap(image_folder, tiny_checkpoint):
    common = ["--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint, "--llm", "overlap",
              "--ways", 2, "--episodes", 4]
    calibrated = invoke(*common, "--calibrate")
    assert calibrated.exit_code == 1 and "--calibrate" in calibrated.stderr and calibrated.stdout == ""
    mixed = invoke(*common, "--calibrate", "--scoring", "generate")
    assert mixed.exit_code == 1 and "--scoring loglik" in mixed.stderr
    ordered = invoke(*common, "--order", "similar-last", "--scoring", "constrained", "--labels", "letters", "--json")
    assert ordered.exit_code == 0, ordered.stderr
    assert json.loads(ordered.stdout)["settings"]["order"] == "similar-last"


def test_token_datasets_need_no_model(image_folder, tiny_checkpoint, tmp_path):
    tokens = tmp_path / "tokens.safetensors"
    write_token_dataset(tokens, encode_folder(load_model(tiny_checkpoint), scan_image_folder(image_folder)))
    result = invoke("--support", tokens, "--query", tokens, "--llm", "overlap", "--ways", 2, "--episodes", 8, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["episodes"] == 8
    predicted = invoke("--support", tokens, tokens, "--llm", "overlap", "--shots", 1)
    assert predicted.exit_code == 0 and len(predicted.stdout.splitlines()) == 12  # every row of the dataset


def test_local_llm_end_to_end(image_folder, tiny_checkpoint, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    result = invoke("--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint,
                    "--llm", f"hf:{tiny_gpt2_dir}", "--ways", 2, "--shots", 2, "--repeats", 1, "--episodes", 4,
                    "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mean_prompt_tokens"] > 50 and summary["dropped"]["episodes"] == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert set(record["scores"]) == {"red", "blue"} and record["prompt_tokens"] > 50
    assert record["predicted"] == "blue"  # the tiny model was biased towards "blue"


def test_budget_cuts_are_reported_and_an_impossible_fit_is_an_error(image_folder, tiny_checkpoint, tiny_gpt2_dir):
    common = ["--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint,
              "--llm", f"hf:{tiny_gpt2_dir}", "--ways", 2, "--shots", 2, "--repeats", 1, "--episodes", 2]
    roomy = json.loads(invoke(*common, "--json").stdout)
    tight = invoke(*common, "--json", "--context-tokens", int(roomy["mean_prompt_tokens"] * 0.6))
    assert tight.exit_code == 0, tight.stderr
    summary = json.loads(tight.stdout)
    assert summary["dropped"]["episodes"] == 2 and summary["dropped"]["repeats"] == 2
    assert "note: to fit the context window" in tight.stderr
    impossible = invoke(*common, "--context-tokens", 20)
    assert impossible.exit_code != 0 and impossible.stdout == ""
    assert impossible.stderr.startswith("error: ") and "does not fit in" in impossible.stderr


def test_bad_input_is_one_error_line(image_folder, tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    query = first_image(image_folder, "red")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cases = [
        (["--support", empty, query, "--model", tiny_checkpoint, "--llm", "overlap"], "no readable images"),
        (["--support", image_folder, query, "--model", tiny_checkpoint, "--template", "nope"], "available: chat, completion"),
        (["--support", image_folder, query, "--model", tiny_checkpoint, "--llm", "gpt"], "hf:NAME_OR_PATH"),
        (["--support", image_folder, query, "--llm", "overlap"], "--model"),
        (["--support", image_folder, query, "--model", tiny_checkpoint, "--ways", 3], "apply to evaluation"),
        (["--support", image_folder, "--query", image_folder, "--model", tiny_checkpoint, "--llm", "overlap",
          "--ways", 3], "3-way 1-shot episodes need 3 classes"),
        (["--support", image_folder, query, "--model", tiny_checkpoint, "--llm", "openai:m",
          "--api-base", f"http://127.0.0.1:{port}/v1", "--retries", 0, "--context-tokens", 4096], "cannot reach"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code != 0, args
        assert result.stdout == "", args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


def test_the_default_llm_answers_offline_with_the_overlap_baseline_and_says_so(image_folder, tiny_checkpoint, monkeypatch):
    for name in ("LQAE_LLM", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    common = ["--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--episodes", "8", "--json"]
    default, overlap = invoke(*common), invoke(*common, "--llm", "overlap")
    assert default.exit_code == 0, default.output
    assert json.loads(default.stdout)["accuracy"] == json.loads(overlap.stdout)["accuracy"]
    assert "note: --llm auto: overlap (no LLM server configured" in default.stderr
    assert "note:" not in overlap.stderr  # a chosen --llm needs no note
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # a server without a model name: still overlap
    assert "OPENAI_BASE_URL is set but OPENAI_MODEL is not" in invoke(*common).stderr


def test_the_default_llm_uses_the_server_the_environment_names(image_folder, tiny_checkpoint, monkeypatch):
    with StubServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_MODEL", "stub-model")
        monkeypatch.delenv("LQAE_LLM", raising=False)
        result = invoke("--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--episodes", "2",
                        "--json")
        assert result.exit_code == 0, result.output
        assert "note: --llm auto: openai:stub-model (the server OPENAI_BASE_URL and OPENAI_MODEL name)" in result.stderr
        assert server.requests and server.requests[0]["model"] == "stub-model"
    monkeypatch.setenv("LQAE_LLM", "overlap")  # LQAE_LLM wins
    result = invoke("--support", image_folder, "--query", image_folder, "-m", tiny_checkpoint, "--episodes", "2")
    assert "note: --llm auto: overlap ($LQAE_LLM)" in result.stderr
