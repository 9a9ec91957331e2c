"""`lqae fewshot --llm openai:... --concurrency N` against a local OpenAI-compatible stub server that
answers every request after a fixed latency (a remote server's round trip): seconds per evaluation
at each N, in alternating rounds, and whether the records match those of N=1 (wall-time field aside).

The stub is the test suite's (tests/test_fewshot_helpers.StubServer, 127.0.0.1 only); episodes are
2-way 1-shot with calibration (8 requests each: 2 labels, and 2 labels after 3 content-free inputs).

Usage: python bench/fewshot_concurrency.py [--episodes 40] [--latency 0.05] [--concurrency 1,8] [--rounds 2]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from lqae.fewshot.evaluation import evaluate_episodes  # noqa: E402
from lqae.fewshot.prompts import load_template  # noqa: E402
from lqae.fewshot.results import ResultsFile  # noqa: E402
from lqae.fewshot.settings import FewshotSettings  # noqa: E402
from test_fewshot_helpers import StubServer, WordTokenizer, synthetic_pool  # noqa: E402
from test_fewshot_openai import backend_for  # noqa: E402


def run(server, path: Path, episodes: int, concurrency: int) -> tuple[float, list[dict]]:
    support = synthetic_pool(classes=("cat", "dog", "eel"))
    query = synthetic_pool(classes=("cat", "dog", "eel"), prefix="val", seed=1)
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    evaluate_episodes(support, query, backend_for(server.url, timeout=30), load_template("completion"),
                      FewshotSettings(ways=2, shots=1, episodes=episodes, seed=0), WordTokenizer(),
                      ResultsFile(path, "bench", "episode"), concurrency=concurrency)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("seconds")
    return seconds, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the stub waits before each answer")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    seconds = {n: [] for n in levels}
    same = {n: True for n in levels}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work, StubServer(latency=args.latency) as server:
        reference = None
        for _ in range(args.rounds):
            for n in levels:
                wall, records = run(server, Path(work) / f"c{n}.jsonl", args.episodes, n)
                seconds[n].append(wall)
                reference = reference if reference is not None else records
                same[n] = same[n] and records == reference
        requests, most = len(server.requests), server.most_in_flight
    base = levels[0]
    print(json.dumps({
        "bench": "fewshot_concurrency", "episodes": args.episodes, "latency_s": args.latency,
        "requests_per_run": requests // (args.rounds * len(levels)), "most_in_flight": most,
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        "cells": [{
            "concurrency": n, "seconds": [round(s, 3) for s in seconds[n]],
            "episodes_per_s": round(args.episodes / statistics.median(seconds[n]), 2),
            f"speedup_vs_{base}": round(statistics.median(b / s for b, s in zip(seconds[base], seconds[n])), 2),
            "same_records": same[n],
        } for n in levels],
    }))


if __name__ == "__main__":
    main()
