"""Where a training step's time goes: the `tiny` preset's step (forward, backward, AdamW) against
variants and the FSQ peer, interleaved in one process so the ratios survive a shared machine.

    python bench/steptime.py                       # fp32 default, no global tokens, bf16, FSQ peer (fp32, bf16)
    python bench/steptime.py --compile             # also torch.compile of the default (slow to build)
    python bench/steptime.py --profile             # also the top operators of the default step

Random images, batch and threads as given; the last line is one JSON object: seconds per step
(median of the rounds), each variant's ratio to the fp32 default, and the landed default on this CPU
(`--precision auto`) against the FSQ peer in the same precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import PeerAutoencoder  # noqa: E402

from lqae.presets import apply_overrides, get_preset  # noqa: E402
from lqae.model.autoencoder import LQAE  # noqa: E402
from lqae.model.lm import load_frozen_lm  # noqa: E402
from lqae.training.objective import Objective  # noqa: E402
from lqae.training.parts import autocast, resolve_precision  # noqa: E402

VARIANTS = {"default": [], "no_global_tokens": ["global_tokens=0"]}  # --set overrides of the tiny preset


def lqae_step(overrides: list[str], batch: int, bf16: bool = False, compile_model: bool = False):
    """One training step of the tiny preset with `overrides`, as the trainer takes it: the objective
    (with the global words, a second view against the EMA teacher), backward, AdamW, the teacher's update."""
    torch.manual_seed(0)
    preset = apply_overrides(get_preset("tiny"), overrides)
    lm = load_frozen_lm(preset.model.lm_name, with_mlm_head=preset.train.mask.mlm_weight > 0)
    objective = Objective(LQAE(preset.model, lm=lm), preset.train, lm.mlm_head).train()
    model = objective.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(objective) if compile_model else objective
    images = torch.rand(batch, 3, preset.model.image_size, preset.model.image_size)
    second_view = images.flip(-1) if objective.distill is not None else None

    def step() -> None:
        with autocast("bf16" if bf16 else "fp32", "cpu"):
            _, _, loss = forward(images, second_view)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if objective.distill is not None:
            objective.distill.update_teacher(model.encoder.global_encoder)

    return step


def peer_step(kind: str, batch: int, bf16: bool = False):
    torch.manual_seed(0)
    preset = get_preset("tiny")
    model = PeerAutoencoder(preset, kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, preset.model.image_size, preset.model.image_size)

    def step() -> None:
        with autocast("bf16" if bf16 else "fp32", "cpu"):
            reconstruction, _, aux = model(images)
        (F.mse_loss(reconstruction.float(), images) + aux.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the default")
    parser.add_argument("--profile", action="store_true", help="also list the default step's top operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {name: lqae_step(overrides, args.batch) for name, overrides in VARIANTS.items()}
    variants["bf16_autocast"] = lqae_step([], args.batch, bf16=True)
    variants["fsq_peer"] = peer_step("fsq", args.batch)
    variants["fsq_peer_bf16"] = peer_step("fsq", args.batch, bf16=True)
    if args.compile:
        variants["compiled"] = lqae_step([], args.batch, compile_model=True)
    for step in variants.values():  # warm-up (and, for compile, the build)
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - started) / args.steps)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
        "seconds_per_step": {name: round(value, 4) for name, value in seconds.items()},
        "ratio_to_default": {name: round(value / seconds["default"], 3) for name, value in seconds.items()},
    }
    # the landed default on this CPU (precision auto) against the FSQ peer in the same precision
    landed = resolve_precision("auto", "cpu")
    ours, peer = ("bf16_autocast", "fsq_peer_bf16") if landed == "bf16" else ("default", "fsq_peer")
    result["landed_precision"] = landed
    result["landed_vs_fsq_peer"] = round(seconds[ours] / seconds[peer], 3)
    if args.profile:
        step = variants["default"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                step()
        events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        total = sum(e.self_cpu_time_total for e in profiler.key_averages())
        result["top_operators"] = [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3)} for e in events]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
