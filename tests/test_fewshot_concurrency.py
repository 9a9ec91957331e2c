"""`--concurrency N` against an OpenAI-compatible stub server: the same records, in episode (or
query) order, a resume that stays exact, and retries that stay per request."""

from __future__ import annotations

import json

import pytest

from lqae.errors import ConfigError, LLMError
from lqae.fewshot.backends.overlap import OverlapBackend
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.labelling import label_queries
from lqae.fewshot.prompts import load_template
from lqae.fewshot.results import ResultsFile
from lqae.fewshot.settings import FewshotSettings
from lqae_cli.app import app
from test_fewshot_helpers import StubServer, WordTokenizer, synthetic_pool
from test_fewshot_openai import backend_for
from typer.testing import CliRunner

SUPPORT = synthetic_pool(classes=("cat", "dog", "eel"))
QUERY = synthetic_pool(classes=("cat", "dog", "eel"), prefix="val", seed=1)


def evaluate(server, path, episodes=12, concurrency=1, **backend):
    with ResultsFile(path, "run", "episode") as results:  # closed (and unlocked) even when a request fails
        return evaluate_episodes(
            SUPPORT, QUERY, backend_for(server.url, **backend), load_template("completion"),
            FewshotSettings(ways=2, shots=1, episodes=episodes, seed=0), WordTokenizer(), results,
            concurrency=concurrency,
        )


def records(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("seconds")  # wall time, the one field that differs
    return lines


def test_concurrent_episodes_give_the_same_records_in_episode_order(tmp_path):
    with StubServer(latency=0.01) as server:
        one = evaluate(server, tmp_path / "one.jsonl")
        assert server.most_in_flight == 1
    with StubServer(latency=0.01) as server:
        eight = evaluate(server, tmp_path / "eight.jsonl", concurrency=8)
        assert 1 < server.most_in_flight <= 8
    assert records(tmp_path / "eight.jsonl") == records(tmp_path / "one.jsonl")
    assert [r["episode"] for r in records(tmp_path / "eight.jsonl")] == list(range(12))
    assert (eight.accuracy, eight.correct, eight.diagnostics) == (one.accuracy, one.correct, one.diagnostics)


def test_resume_and_a_failure_midway_stay_exact(tmp_path):
    with StubServer() as server:
        evaluate(server, tmp_path / "straight.jsonl", episodes=10)
    with StubServer(fail_after=40) as server:  # an outage part of the way through
        with pytest.raises(LLMError, match="HTTP 500"):
            evaluate(server, tmp_path / "resumed.jsonl", episodes=10, concurrency=4, retries=0)
    kept = records(tmp_path / "resumed.jsonl")
    assert 0 < len(kept) < 10 and kept == records(tmp_path / "straight.jsonl")[: len(kept)]  # a complete prefix
    with StubServer(fail_first=[429, 503, 500, 429]) as server:  # retried per request, the others unaffected
        summary = evaluate(server, tmp_path / "resumed.jsonl", episodes=10, concurrency=4, retries=4)
    assert summary.resumed == len(kept)
    assert records(tmp_path / "resumed.jsonl") == records(tmp_path / "straight.jsonl")


def test_concurrent_labelling_keeps_query_order(tmp_path):
    queries = synthetic_pool(classes=("cat", "dog", "eel"), per_class=3, prefix="new", seed=2)
    queries.paths[4], queries.ids[4] = queries.paths[1], queries.ids[1]  # a query given twice is answered once
    runs = {}
    for concurrency in (1, 4):
        with StubServer() as server, ResultsFile(tmp_path / f"labels{concurrency}.jsonl", "run", ("query", "content")) as out:
            runs[concurrency] = label_queries(
                SUPPORT, queries, backend_for(server.url), load_template("completion"),
                FewshotSettings(shots=1, episodes=1, seed=0), WordTokenizer(), out, concurrency=concurrency,
            )
    assert [(p.path, p.label, p.scores) for p in runs[4].predictions] == [
        (p.path, p.label, p.scores) for p in runs[1].predictions
    ]
    assert len((tmp_path / "labels4.jsonl").read_text().splitlines()) == len(set(queries.paths)) == 8


def test_concurrency_is_refused_where_requests_cannot_run_in_parallel():
    with pytest.raises(ConfigError, match="--concurrency 2 needs a backend .* overlap answers one at a time"):
        evaluate_episodes(SUPPORT, QUERY, OverlapBackend(), load_template("completion"),
                          FewshotSettings(ways=2, shots=1, episodes=2, calibrate=False), WordTokenizer(), concurrency=2)


def test_cli_concurrency_for_a_local_backend_is_one_error_line(image_folder, tiny_checkpoint):
    result = CliRunner().invoke(app, ["fewshot", "--support", str(image_folder), str(image_folder / "red" / "red_001.png"),
                                      "-m", str(tiny_checkpoint), "--llm", "overlap", "--concurrency", "3"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: --concurrency 3 needs a backend that answers requests in parallel (openai:MODEL); overlap answers "
        "one at a time: leave --concurrency at 1"
    ]
