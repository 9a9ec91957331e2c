"""Few-shot protocol table: the bundled local LLM (`--llm hf`, SmolLM2-135M) on token text under each prompt option, next to
the `overlap` baseline and chance.

Runs `lqae fewshot --json` for every (setting, variant) pair as separate processes, `--jobs` at a
time with one thread each, and keeps each run's JSON (and `--out` results, so an interrupted table
resumes) under --work. Settings are WAYS,SHOTS pairs; variants are named option sets (VARIANTS).

Usage: python bench/llm_protocol.py --support train.safetensors --query val.safetensors
       [--episodes 300] [--settings 2,1 5,1 5,5] [--variants plain calibrated ...] [--jobs 2]
Prints one JSON line per finished run, then one JSON object (every row) as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # every option spelled out, so a change of defaults cannot change a row
    "overlap": ["--llm", "overlap", "--order", "random"],
    "plain": ["--llm", "hf", "--no-calibrate", "--order", "random"],
    "calibrated": ["--llm", "hf", "--calibrate", "--order", "random"],
    "similar-last": ["--llm", "hf", "--no-calibrate", "--order", "similar-last"],
    "calibrated+similar-last": ["--llm", "hf", "--calibrate", "--order", "similar-last"],
    "calibrated+similar-last+repeats1": ["--llm", "hf", "--calibrate", "--order", "similar-last", "--repeats", "1"],
    "letters+calibrated+similar-last": ["--llm", "hf", "--labels", "letters", "--calibrate", "--order", "similar-last"],
    "constrained": ["--llm", "hf", "--scoring", "constrained"],
    "frequent+calibrated+similar-last": ["--llm", "hf", "--image-text", "frequent", "--calibrate", "--order",
                                         "similar-last"],
}


def run_one(args, ways: int, shots: int, variant: str) -> dict:
    name = f"{ways}way{shots}shot-{variant}"
    command = [
        sys.executable, "-m", "lqae_cli", "fewshot", "--support", str(args.support), "--query", str(args.query),
        "--ways", str(ways), "--shots", str(shots), "--episodes", str(args.episodes), "--seed", str(args.seed),
        "--json", "--quiet", "--out", str(args.work / f"{name}.jsonl"), *VARIANTS[variant],
    ]
    if args.model:
        command += ["--model", str(args.model)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"setting": f"{ways}-way {shots}-shot", "variant": variant, "error": done.stderr.strip()[-300:]}
    summary = json.loads(done.stdout)
    diagnostics = summary["diagnostics"]
    row = {
        "setting": f"{ways}-way {shots}-shot", "variant": variant, "accuracy": round(summary["accuracy"], 4),
        "interval": [round(x, 4) for x in summary["interval"]], "episodes": summary["episodes"],
        "chance": summary["chance"], "seconds_per_episode": round(summary["seconds_per_episode"], 3),
        "mean_prompt_tokens": round(summary["mean_prompt_tokens"], 1),
        "answers_last_example": diagnostics["answers_last_example"],
        "most_answered": max(diagnostics["predicted"].items(), key=lambda kv: kv[1], default=None),
    }
    (args.work / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--support", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="LQAE checkpoint, when support/query are image folders.")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["2,1", "5,1", "5,5"])
    parser.add_argument("--variants", nargs="+", default=["overlap", "plain", "calibrated", "calibrated+similar-last",
                                                            "calibrated+similar-last+repeats1"], choices=sorted(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/llm_protocol"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = [(*map(int, s.split(",")), v) for s in args.settings for v in args.variants]
    pairs.sort(key=lambda p: -p[0] * p[1])  # longest first, so the pool ends together
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda p: run_one(args, *p), pairs))
    print(json.dumps({"episodes": args.episodes, "seed": args.seed, "rows": rows}))


if __name__ == "__main__":
    main()
