"""Model quality bench: train a preset on visible data sets, then score it on held-out images.

Usage: python bench/quality.py [--preset tiny] [--steps N] [--seed 0] [--set key=value ...]
                               [--datasets digits,photos,shapes,edges] [--peers fsq|all|LIST|'']
                               [--out runs/bench] [--episodes 300] [--no-probe] [--with-reference] [--jobs 2]

Data sets (generated under data/bench/, see tools/): digits (scikit-learn's 8x8 digits at 32 px, 10
classes: smooth strokes), photos (crops of scikit-learn's two sample photos, 6 classes: mostly flat
natural texture), shapes (white-on-black silhouettes of 8 named classes: sharp edges, thin parts,
holes) and edges (crops of 8 of scikit-image's photos: edges and fine detail); val never overlaps
train. For each, it trains the preset with its defaults (plus any `--set` overrides of
ModelConfig/TrainConfig fields), then reports on the held-out split: PSNR, SSIM, distinct codes,
code perplexity, the final commitment/reconstruction loss ratio, the linear probe (`--layers lm`)
next to the same head on the encoder's own output (`enc:-1`), raw pixels and a random encoder, and
token-overlap few-shot accuracy (2-way and 5-way 1-shot).
Peers (`--peers`, default fsq; `all` = fsq,vq,continuous; see bench/peers.py) train the same encoder,
decoder, steps, batch, augmentation and schedule with another bottleneck, in the same run; each data
set's `gap_fsq_db` is lqae's held-out PSNR minus FSQ's. Progress goes to stderr; one JSON object is
the last line of stdout. `--with-reference` also trains the reference recipe (REFERENCE below).
`--jobs 2` (default) runs two data sets at a time, each in its own process on one thread: on two
cores that is faster than one process on two threads, and each figure is the same as a `--jobs 1
--threads 1` run gives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

sys.path.insert(0, str(ROOT / "bench"))

from make_digits import write_digits  # noqa: E402
from make_photo_crops import write_photo_crops  # noqa: E402
from make_shapes import write_shapes  # noqa: E402

from lqae.checkpoint import load_model  # noqa: E402
from lqae.config import Masking, ModelConfig  # noqa: E402
from lqae.presets import RECIPE, Preset, apply_overrides, get_preset  # noqa: E402
from lqae.images.files import scan_image_folder  # noqa: E402
from lqae.fewshot.backends.overlap import OverlapBackend  # noqa: E402
from lqae.fewshot.episodes import pool_from_dataset  # noqa: E402
from lqae.fewshot.evaluation import evaluate_episodes  # noqa: E402
from lqae.fewshot.prompts import load_template  # noqa: E402
from lqae.fewshot.settings import FewshotSettings  # noqa: E402
from lqae.probe import ProbeConfig, run_probe  # noqa: E402
from lqae.reconstruction import evaluate_folder  # noqa: E402
from lqae.tokendata import encode_folder  # noqa: E402
from lqae.callbacks import TrainCallback  # noqa: E402
from lqae.run_folder import METRICS_FILE  # noqa: E402
from lqae.training import train  # noqa: E402
from lqae.training.parts import resolve_precision  # noqa: E402
from peers import PEERS, train_peer  # noqa: E402

DATASETS = {
    "digits": write_digits,
    "photos": write_photo_crops,
    "shapes": write_shapes,
    "edges": lambda out: write_photo_crops(out, train_per_class=250, val_per_class=50, source="skimage"),
}
# The reference decisions on the tiny architecture, i.e. the tiny preset as it was before the recipe
# work: every RECIPE field at its reference default, the reference's mask, no global words, a 128-wide
# 2-layer decoder, batch 64 for 600 steps, crops of 20-100% of the image. `--with-reference` trains it
# beside the chosen recipe; `--reference-base` starts from it.
REFERENCE = [f"{name}={json.dumps(getattr(ModelConfig(), name))}" for name in RECIPE] + [
    f"mask.ratio={Masking().ratio}", "global_tokens=0", "decoder_width=128", "decoder_depth=2", "decoder_heads=4",
    "batch_size=64", "steps=600", "crop_scale_min=0.2",
]


def prepare(name: str, data_root: Path) -> Path:
    folder = data_root / name
    if not (folder / "val").is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        DATASETS[name](folder)
    return folder


class StderrLog(TrainCallback):
    def __init__(self, label: str, every: int = 100) -> None:
        self.label, self.every = label, every

    def on_step(self, step: int, metrics: dict) -> None:
        if step % self.every == 0 and metrics:
            print(
                f"[{self.label}] step {step} recon {metrics['recon_loss']:.4f} psnr {metrics['psnr']:.2f} "
                f"codes {metrics['unique_codes']} ratio {metrics.get('commit_recon_ratio', 0):.3g} "
                f"|z| {metrics.get('encoder_norm', 0):.3g} {metrics['sec_per_step']:.2f}s/step",
                file=sys.stderr, flush=True,
            )


def last_train_metrics(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    train_lines = [line for line in lines if "recon_loss" in line]
    return train_lines[-1] if train_lines else {}


def run_dataset(name: str, folder: Path, run_dir: Path, recipe: Preset, episodes: int, probe: bool = True) -> dict:
    seed = recipe.train.seed
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    train(folder / "train", run_dir, recipe.model, recipe.train, callbacks=[StderrLog(run_dir.name)])
    train_seconds = time.perf_counter() - started

    model = load_model(run_dir)
    val = scan_image_folder(folder / "val")
    report = evaluate_folder(model, val, run_dir / "heldout.png")
    final = last_train_metrics(run_dir)

    started = time.perf_counter()
    probed = {}
    if probe:
        result, _ = run_probe(model, folder / "train", folder / "val", ProbeConfig(layers="lm", seed=seed))
        # the same head on the encoder's own output (its last block, mean-pooled): which part carries the class
        encoder, _ = run_probe(model, folder / "train", folder / "val", ProbeConfig(layers="enc:-1", baselines=(), seed=seed))
        probed = {"probe_top1": round(result.probe.top1, 4), "encoder_top1": round(encoder.probe.top1, 4),
                  "pixels_top1": round(result.baselines["pixels"].top1, 4),
                  "random_encoder_top1": round(result.baselines["random-encoder"].top1, 4)}
    probe_seconds = time.perf_counter() - started

    support = pool_from_dataset(encode_folder(model, scan_image_folder(folder / "train")), "train")
    query = pool_from_dataset(encode_folder(model, val), "val")
    fewshot = {}
    for ways in (2, 5):
        settings = FewshotSettings(ways=ways, shots=1, episodes=episodes, seed=seed)
        template = load_template("completion")
        summary = evaluate_episodes(support, query, OverlapBackend(), template, settings, model.tokenizer)
        fewshot[f"overlap_{ways}way_1shot"] = round(summary.accuracy, 4)

    return {
        "train_images": len(scan_image_folder(folder / "train", check=False)),
        "val_images": report.images,
        "psnr": round(report.psnr, 3),
        "ssim": round(report.ssim, 4),
        "unique_codes": report.unique_codes,
        "code_perplexity": round(report.code_perplexity, 1),
        "commit_recon_ratio": round(final.get("commit_recon_ratio", 0.0), 4),
        "encoder_norm": round(final.get("encoder_norm", 0.0), 4),
        "train_psnr": round(final.get("psnr", 0.0), 3),
        **probed,
        **fewshot,
        "train_seconds": round(train_seconds, 1),
        "sec_per_step": round(final.get("sec_per_step", 0.0), 3),
        "probe_seconds": round(probe_seconds, 1),
        "grid": str(run_dir / "heldout.png"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ModelConfig or TrainConfig field (repeatable)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of: {', '.join(DATASETS)}")
    parser.add_argument("--peers", default="fsq", help=f"comma list of: {', '.join(PEERS)}; 'all'; '' for none")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="skip the linear probe (faster)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="run folders go here (replaced)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench", help="generated data sets (cached)")
    parser.add_argument("--episodes", type=int, default=300, help="few-shot episodes per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1 with --jobs > 1)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="data sets trained at once, each in its own process on one thread (default 2: two cores)")
    parser.add_argument("--with-reference", action="store_true",
                        help="also train the reference recipe (REFERENCE below) on each data set, same seed")
    parser.add_argument("--reference-base", action="store_true",
                        help="apply --set on top of the reference recipe instead of the preset (ablation rows)")
    args = parser.parse_args()
    if args.threads or args.jobs > 1:
        torch.set_num_threads(args.threads or 1)
    pinned = [f"seed={args.seed}"] + ([f"steps={args.steps}"] if args.steps else [])
    base = REFERENCE if args.reference_base else []
    recipes = {"": apply_overrides(get_preset(args.preset), base + args.overrides + pinned)}
    if args.with_reference:
        recipes["reference"] = apply_overrides(get_preset(args.preset), REFERENCE + pinned)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown data set {unknown[0]!r}; choose from: {', '.join(DATASETS)}")
    peers = list(PEERS) if args.peers == "all" else [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in peers):
        raise SystemExit(f"unknown peer in {args.peers!r}; choose from: {', '.join(PEERS)}, all")

    started = time.perf_counter()
    result: dict = {"preset": args.preset, "steps": args.steps, "seed": args.seed, "overrides": args.overrides,
                    "precision": resolve_precision(recipes[""].train.precision, "cpu")}  # lqae's and the peers'
    for name in names:
        prepare(name, args.data)  # once, before any job reads it
    if args.jobs > 1 and len(names) > 1:
        result.update(run_in_processes(names, args.jobs))
    else:
        for name in names:
            result.update(bench_dataset(name, args, recipes, peers))
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


def bench_dataset(name: str, args, recipes: dict, peers: list[str]) -> dict:
    """Every row of one data set: the recipe(s), then the peers, with the gap to FSQ."""
    folder, rows = args.data / name, {}
    for label, recipe in recipes.items():
        key = f"{name}_{label}" if label else name
        rows[key] = run_dataset(name, folder, args.out / key, recipe, args.episodes, args.probe)
        print(f"[{key}] " + json.dumps(rows[key]), file=sys.stderr, flush=True)
    for peer in peers:
        figures = train_peer(peer, folder, args.out / f"{name}_{peer}", recipes[""])
        rows[name][peer] = figures
        print(f"[{name}_{peer}] " + json.dumps(figures), file=sys.stderr, flush=True)
    if "fsq" in peers:
        rows[name]["gap_fsq_db"] = round(rows[name]["psnr"] - rows[name]["fsq"]["psnr"], 3)
    return rows


def run_in_processes(names: list[str], jobs: int) -> dict:
    """This bench once per data set (`--datasets NAME --jobs 1`, one thread, same other options),
    `jobs` at a time; their stderr passes through, their last lines are merged."""
    argv = list(sys.argv[1:])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(name: str) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--datasets", name, "--jobs", "1",
                   "--threads", "1"]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the {name} job failed (exit {done.returncode}); its messages are above")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        return {k: v for k, v in row.items()
                if k not in ("preset", "steps", "seed", "overrides", "precision", "total_seconds")}

    merged: dict = {}
    with ThreadPoolExecutor(jobs) as pool:
        for rows in pool.map(one, names):
            merged.update(rows)
    return merged


if __name__ == "__main__":
    main()
