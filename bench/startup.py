"""Cold start of the commands a shell script calls once per image, next to `import torch`.

A tiny-preset LQAE with random weights (MiniLM codebook, from the offline package) is saved to a
temp folder with one 32px PNG and a two-class support folder. Each round runs, as fresh processes,
in this order: `python -c "import torch"`, `python -c "import torch, transformers"`,
`lqae encode one.png`, `lqae decode TOKENS` (one token line) and `lqae fewshot --llm overlap` (one
query). Rounds interleave the commands so that machine load hits them alike; the figures are
medians over --rounds, and the ratios divide each by `import torch` of the same run.

Usage: python bench/startup.py [--rounds 7] [--keep DIR]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lqae.checkpoint import save_checkpoint
from lqae.presets import get_preset
from lqae.model import LQAE

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return wall, done.stdout


def prepare(work: Path) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    preset = get_preset("tiny")
    run = work / "run"
    save_checkpoint(run, LQAE(preset.model), preset.train, step=0)
    rng = np.random.default_rng(0)
    support = work / "support"
    for label in ("cat", "dog"):
        (support / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(support / label / f"{i}.png")
    one = work / "one.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(one)
    return run, support, one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="Work folder to keep (default: a temp folder, removed).")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lqae-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(measure(work, args.rounds)))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, rounds: int) -> dict:
    run, support, one = prepare(work)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    lqae = [sys.executable, "-m", "lqae_cli"]
    _, tokens = timed([*lqae, "encode", str(one), "-m", str(run), "--format", "tokens"], env)
    commands = {
        "import_torch": [sys.executable, "-c", "import torch"],
        "import_torch_transformers": [sys.executable, "-c", "import torch, transformers"],
        "encode": [*lqae, "encode", str(one), "-m", str(run)],
        "decode": [*lqae, "decode", tokens.strip(), "-m", str(run), "--out", str(work / "back.png"), "-q"],
        "fewshot_overlap": [*lqae, "fewshot", "--support", str(support), str(one), "-m", str(run), "--llm", "overlap",
                            "--quiet"],
    }
    for command in commands.values():  # warm the file cache once
        timed(command, env)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            walls[name].append(timed(command, env)[0])
    medians = {name: statistics.median(values) for name, values in walls.items()}
    base = medians["import_torch"]
    return {
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "seconds": {name: round(value, 3) for name, value in medians.items()},
        "spread_seconds": {name: [round(min(v), 3), round(max(v), 3)] for name, v in walls.items()},
        "ratio_to_import_torch": {name: round(value / base, 2) for name, value in medians.items()},
        "encode_target_ratio": 1.5,
        "encode_within_target": medians["encode"] / base <= 1.5,
    }


if __name__ == "__main__":
    main()
