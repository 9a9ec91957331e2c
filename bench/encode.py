"""`lqae encode` end to end on the `tiny` preset: speed through the CLI next to the model alone, and
peak memory while writing a token dataset (it must not grow with the number of images).

No training needed: a tiny-preset LQAE with random weights is saved to a temp folder, and synthetic
32x32 PNGs (10 class folders) are written next to it. Every figure comes from this one run:
1. `python -m lqae_cli encode DIR` on --images PNGs (stdout read back and checked): images/s end to
   end, next to (a) the forward time the CLI itself measured (`--timings`, model_s) and (b) the same
   forward (model.encode, same batches) timed in this process on the same pixels, pre-loaded;
2. the start-up alone (`encode` of one image): interpreter, imports, model load;
3. peak RSS (ru_maxrss of that child, via wait4) of `encode DIR --out tokens.safetensors` on
   --images and on --big-images PNGs.

Usage: python bench/encode.py [--images 1000] [--big-images 10000] [--batch-size 64] [--keep DIR]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lqae.checkpoint import load_model, save_checkpoint
from lqae.presets import get_preset
from lqae.images.files import load_image, scan_image_folder
from lqae.model import LQAE
from lqae.tokendata import read_token_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10


def write_images(root: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """`count` smooth random blobs with noise, spread over CLASSES sub-folders."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    for i in range(count):
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx, radius = rng.uniform(6, size - 6, 2).tolist() + [rng.uniform(3, 10)]
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        colour = rng.uniform(40, 255, 3)
        pixels = blob[..., None] * colour + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
    return root


def cli(*args: str) -> tuple[float, str, str]:
    """Run `python -m lqae_cli ARGS`: (wall seconds, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lqae_cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lqae {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return wall, done.stdout, done.stderr


def timings_from(stderr: str) -> dict:
    line = next(line for line in stderr.splitlines() if line.startswith("timings: "))
    return json.loads(line[len("timings: "):])


def peak_rss_kib(*args: str) -> int:
    """Peak RSS (ru_maxrss, KiB) of one CLI child, from wait4 on that child alone."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "lqae_cli", *args], stdout=subprocess.DEVNULL, stderr=errors, env=env
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"lqae {' '.join(args)} failed:\n{errors.read().decode()}")
    return usage.ru_maxrss


def forward_alone(run: Path, folder: Path, batch_size: int) -> tuple[float, list[list[int]]]:
    """model.encode on the same images, pre-loaded as tensors: (seconds, ids). Same batches as the CLI
    and, like it, a freshly loaded model whose first batch pays the one-time kernel set-up."""
    model = load_model(run)
    paths = scan_image_folder(folder).paths
    images = torch.stack([load_image(p, model.config.image_size) for p in paths])
    started = time.perf_counter()
    ids = [model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    seconds = time.perf_counter() - started
    return seconds, torch.cat(ids).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the speed run and the small memory run")
    parser.add_argument("--big-images", type=int, default=10000, help="images for the large memory run")
    parser.add_argument("--batch-size", type=int, default=64, help="the CLI's default")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()

    logging.getLogger("lqae").setLevel(logging.ERROR)  # the LM's missing MLM head only matters to training
    work = args.keep or Path(tempfile.mkdtemp(prefix="lqae-bench-encode-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def measure(args, work: Path) -> dict:
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    config = get_preset("tiny").model
    run = work / "run"
    save_checkpoint(run, LQAE(config))
    small, big = work / f"images_{args.images}", work / f"images_{args.big_images}"
    if not small.exists():
        write_images(small, args.images)
    if not big.exists():
        write_images(big, args.big_images, seed=1)
    batch = ["--batch-size", str(args.batch_size)]

    # 1. start-up alone: one image
    one = next(small.rglob("*.png"))
    startup_wall, _, _ = cli("encode", str(one), "-m", str(run), "--timings")

    # 2. the folder, end to end through the CLI, stdout read back
    wall, out, err = cli("encode", str(small), "-m", str(run), "--timings", *batch)
    lines = out.splitlines()
    if len(lines) != args.images:
        raise SystemExit(f"expected {args.images} lines on stdout, got {len(lines)}")
    inner = timings_from(err)

    # the same forward, in this process
    forward_s, ids = forward_alone(run, small, args.batch_size)
    _, ids_out, _ = cli("encode", str(small), "-m", str(run), "-f", "ids", *batch)
    same_tokens = [list(map(int, line.split("\t")[1].split())) for line in ids_out.splitlines()] == ids

    # 3. peak memory writing token datasets
    rss_small = peak_rss_kib("encode", str(small), "-m", str(run), "-o", str(work / "small.safetensors"), *batch)
    big_started = time.perf_counter()
    rss_big = peak_rss_kib("encode", str(big), "-m", str(run), "-o", str(work / "big.safetensors"), *batch)
    big_wall = time.perf_counter() - big_started

    big_rows = len(read_token_dataset(work / "big.safetensors"))
    pixel_bytes = args.big_images * 3 * config.image_size**2
    file_bytes = (work / "big.safetensors").stat().st_size

    model_s, loop_s = inner["model_s"], inner["total_s"]
    result = {
        "preset": "tiny", "device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        "images": args.images, "batch_size": args.batch_size,
        # End to end through the CLI: python -m lqae_cli encode DIR, stdout read back.
        "cli_wall_s": round(wall, 3),
        "cli_images_per_s": round(args.images / wall, 1),
        # The model's forward alone, timed inside that same CLI run (--timings).
        "forward_s": model_s,
        "forward_images_per_s": round(args.images / model_s, 1),
        "loop_s": loop_s,  # the encode loop: read + decode PNGs, forward, render text, print
        "file_load_s": inner["load_s"],
        "fixed_startup_s": round(wall - loop_s, 3),  # interpreter, torch/transformers imports, model load, scan
        "one_image_wall_s": round(startup_wall, 3),
        # Per-image work besides the forward (loading, decoding files, printing), share of the loop:
        "overhead_per_image": round(1 - model_s / loop_s, 4),
        # End to end, the fixed start-up included:
        "overhead_end_to_end": round(1 - model_s / wall, 4),
        # Cross-check: the same batches on pre-loaded pixels in this (bench) process, a different moment.
        "forward_in_bench_process_s": round(forward_s, 3),
        "same_tokens_cli_vs_in_process": same_tokens,
        # Token dataset (--out): peak RSS of the CLI child, small vs big folder.
        "big_images": args.big_images, "big_rows_written": big_rows, "big_wall_s": round(big_wall, 1),
        "peak_rss_mb_small": round(rss_small / 1024, 1),
        "peak_rss_mb_big": round(rss_big / 1024, 1),
        "peak_rss_growth": round(rss_big / rss_small - 1, 4),
        "big_file_bytes": file_bytes,
        "ids_vs_pixels": round(pixel_bytes / (args.big_images * config.num_tokens * 2), 1),
        "file_vs_pixels": round(pixel_bytes / file_bytes, 1),
    }
    return result


if __name__ == "__main__":
    main()
