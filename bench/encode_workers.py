"""`lqae encode DIR --out` with worker processes against without: images/s on synthetic JPEGs, and
the same ids whatever the worker count.

A random-weight checkpoint of --preset is saved to a temp folder beside --images synthetic
photo-like JPEGs (--side px square, 10 class folders). Each round runs the CLI once per worker
count, in turn (0, 1, 2, 0, 1, 2, ...), so drift of a shared machine hits every count alike; the
ratios to --workers 0 (decoding in the main process, as before workers existed) are taken per round.
Whole-process wall time (interpreter and model load included) and the CLI's own loop time
(`--timings`) are both reported.

Usage: python bench/encode_workers.py [--images 2000] [--side 256] [--workers 0,1,2] [--rounds 3]
       [--preset tiny] [--device cpu] [--batch-size 64]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import write_photos  # noqa: E402

from lqae.checkpoint import save_checkpoint  # noqa: E402
from lqae.presets import get_preset  # noqa: E402
from lqae.model import LQAE  # noqa: E402
from lqae.tokendata import read_token_dataset  # noqa: E402


def encode(folder: Path, run: Path, out: Path, workers: int, batch_size: int, device: str) -> tuple[float, dict]:
    """(whole-process seconds, the CLI's --timings) of one `lqae encode DIR --out`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "lqae_cli", "encode", str(folder), "-m", str(run), "-o", str(out), "--workers",
            str(workers), "--batch-size", str(batch_size), "--device", device, "--timings", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"encode --workers {workers} failed:\n{done.stderr}")
    line = next(line for line in done.stderr.splitlines() if line.startswith("timings: "))
    return wall, json.loads(line[len("timings: "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    logging.getLogger("lqae").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="lqae-bench-encode-workers-"))
    load_before = os.getloadavg()[0]
    try:
        torch.manual_seed(0)
        run = work / "run"
        save_checkpoint(run, LQAE(get_preset(args.preset).model))
        folder = write_photos(work / "images", args.images, args.side, args.side)
        walls = {w: [] for w in counts}
        loops = {w: [] for w in counts}
        ids = {}
        for _ in range(args.rounds):
            for w in counts:
                out = work / f"tokens_{w}.safetensors"
                wall, timings = encode(folder, run, out, w, args.batch_size, args.device)
                walls[w].append(wall)
                loops[w].append(timings["total_s"])
                ids[w] = read_token_dataset(out).ids
        base = counts[0]
        cells = []
        for w in counts:
            cells.append({
                "workers": w,
                "images_per_s": round(args.images / statistics.median(walls[w]), 1),
                "loop_images_per_s": round(args.images / statistics.median(loops[w]), 1),
                "wall_s": [round(x, 2) for x in walls[w]],
                f"ratio_to_{base}_workers": round(statistics.median(b / x for b, x in zip(walls[base], walls[w])), 3),
                f"loop_ratio_to_{base}_workers": round(statistics.median(b / x for b, x in zip(loops[base], loops[w])), 3),
                "same_ids": bool(torch.equal(ids[w], ids[base])),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "bench": "encode_workers", "images": args.images, "jpeg_side": args.side, "preset": args.preset,
        "device": args.device, "batch_size": args.batch_size, "rounds": args.rounds, "cpus": os.cpu_count(),
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2), "cells": cells,
    }))


if __name__ == "__main__":
    main()
