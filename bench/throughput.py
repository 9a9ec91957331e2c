"""Training throughput of one preset on synthetic images: images/s, FLOPs per image, achieved FLOP/s
against a dense matmul on the same device in the same run (and MFU against a given peak), peak
memory, and where a step's time goes (encoder, search, LM, decoder, optimiser).

- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the
  real training step (the frozen LM's forward and its backward to the encoder included), divided
  by the batch; per part, each part's forward + backward counted alone, as the breakdown times it
  (the counter's own module breakdown misplaces the encoder's backward, whose input needs no grad).
- Step time: median of --steps timed steps (after --warmup) of the trainer's own step: autocast,
  forward with the preset's training losses (`lqae.training.Objective`: masking, the second view of
  the global words), backward, AdamW (`lqae.training`'s optimiser and autocast).
- The breakdown times each part alone, forward + backward, on the same batch's real inputs
  (detached, so each part's backward stops at its input), and the optimiser step; "other" is the
  full step less their sum (masking, the MLM head, the self-distillation, the loss, launch gaps).
- Utilisation: achieved FLOP/s over a dense square matmul's FLOP/s measured here, same dtype as
  the step's matmuls (bf16 with --precision bf16, else fp32); with --peak-tflops, MFU too.

Presets whose LM is not on this machine (`base`, `paper`: roberta-base) run on a stand-in: the same
architecture (RobertaConfig's defaults are roberta-base's shapes) with random weights and a
synthetic vocabulary of 50,265 word tokens; throughput does not depend on the weights' values.

Usage: python bench/throughput.py [--preset tiny] [--device cpu] [--precision fp32|bf16] [--compile]
       [--batch-size N] [--steps 10] [--warmup 3] [--peak-tflops 989] [--stand-in-lm] [--threads N]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lqae.presets import PRESETS, get_preset  # noqa: E402
from lqae.errors import LMNotFoundError  # noqa: E402
from lqae.model.autoencoder import LQAE  # noqa: E402
from lqae.model.lm import FrozenLM, load_frozen_lm  # noqa: E402
from lqae.training.objective import Objective  # noqa: E402
from lqae.training.parts import autocast as train_autocast, build_optimizer  # noqa: E402

class StandInTokenizer:
    """What building an LQAE asks of a tokenizer, for a vocabulary of `size` BPE word tokens
    (`Ġaa`, `Ġab`, ...) between RoBERTa's specials and its mask token (the last id)."""

    def __init__(self, size: int = 50265) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz"

        def word(i: int) -> str:
            text = ""
            while True:
                i, r = divmod(i, 26)
                text = letters[r] + text
                if i == 0:
                    return "Ġ" + text
                i -= 1

        self.tokens = ["<s>", "<pad>", "</s>", "<unk>"] + [word(i) for i in range(size - 5)] + ["<mask>"]
        self.mask_token_id, self.all_special_ids = size - 1, [0, 1, 2, 3, size - 1]

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def stand_in_roberta():
    """roberta-base's architecture with random weights, frozen, as `lqae.model.lm.load_frozen_lm` returns it."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1)
    model = RobertaForMaskedLM(config).eval().requires_grad_(False)
    return FrozenLM(model.roberta, model.lm_head, StandInTokenizer(config.vocab_size), position_offset=2)


def build_objective(preset, device: str, stand_in: bool):
    """(the training objective, which LM weights) for the preset; the stand-in LM when asked, or when
    the LM is not here."""
    torch.manual_seed(0)
    lm, weights = None, preset.model.lm_name
    if not stand_in:
        try:
            lm = load_frozen_lm(preset.model.lm_name, with_mlm_head=preset.train.mask.mlm_weight > 0)
        except LMNotFoundError:
            if "roberta" not in preset.model.lm_name:
                raise
    if lm is None:
        lm, weights = stand_in_roberta(), "random stand-in with roberta-base's shapes"
    model = LQAE(preset.model, lm=lm)
    return Objective(model, preset.train, lm.mlm_head).to(device), weights


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_times(fn, device: str, repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of `fn`, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one untimed run."""
    fn()
    return statistics.median(run_times(fn, device, repeats))


def matmul_flops_per_second(device: str, dtype: torch.dtype, side: int, repeats: int = 5) -> float:
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, b), device, repeats)
    return 2 * side**3 / seconds


def flops_of(fn) -> float:
    """FLOPs that `fn` runs (forward and backward ops alike), by `FlopCounterMode`."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def part_steps(model, images: torch.Tensor, autocast) -> dict:
    """One callable per part: its forward + backward alone, on the inputs it gets in the training
    step (detached, so its backward stops there: the LM's backward is the gradient to its input)."""
    model.train()
    reads_lm, lm_backward = model.reads.reads_lm, not model.reads.reads_codes  # the recipe: no gradient into the LM
    with torch.no_grad(), autocast:
        z = model.encoder(images).z
        quant = model.codebook(z)
        lm_input, coordinates = model.reads.lm_input(z, quant.embedded), quant.coordinates.detach().float()
        hidden = model.run_lm(lm_input).last_hidden_state if reads_lm else None  # what the decoder reads
    z, lm_input = z.detach().float(), lm_input.detach().float()
    hidden = hidden.detach().float() if hidden is not None else None

    def encoder():
        with autocast:
            out = model.encoder(images).z
        out.float().pow(2).mean().backward()

    def search():
        given = z.clone().requires_grad_(True)
        with autocast:
            q = model.codebook(given)
        (model.reads.lm_input(given, q.embedded).float().pow(2).mean() + q.commitment
         + q.coordinates.float().pow(2).mean()).backward()

    def lm():
        given = lm_input.clone().requires_grad_(lm_backward)
        with autocast, torch.set_grad_enabled(lm_backward):
            out = model.run_lm(given).last_hidden_state
        if lm_backward:
            out.float().pow(2).mean().backward()

    def decoder():
        given = hidden.clone().requires_grad_(True) if hidden is not None else None
        with autocast:
            out = model.decoder(given, coordinates)
        torch.nn.functional.mse_loss(out.float(), images.float()).backward()

    return {"encoder": encoder, "search": search, **({"lm": lm} if reads_lm else {}), "decoder": decoder}


def measure(
    preset, batch_size: int, device: str = "cpu", precision: str = "fp32", compile: bool = False,
    steps: int = 10, warmup: int = 3, peak_tflops: float | None = None, stand_in: bool = False,
    matmul_side: int | None = None, breakdown_repeats: int = 5,
) -> dict:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    objective, lm_weights = build_objective(preset, device, stand_in)
    model = objective.model
    objective.train()
    optimizer = build_optimizer(model, preset.train)
    autocast = train_autocast(precision, device) if precision == "bf16" else nullcontext()
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch_size, model.config.channels, model.config.image_size, model.config.image_size,
                        device=device, generator=generator)
    parts_alone = part_steps(model, images, autocast)
    part_flops = {name: flops_of(fn) for name, fn in parts_alone.items()}

    second_view = images.flip(-1) if objective.distill is not None else None

    def forward_backward():
        with autocast:
            _, _, loss = objective(images, second_view, torch.Generator(device=device).manual_seed(0))
        loss.backward()

    flops = flops_of(forward_backward)
    model.zero_grad(set_to_none=True)
    if compile:
        model.encoder.compile()
        model.decoder.compile()

    def step():
        with autocast:
            _, _, loss = objective(images, second_view, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if objective.distill is not None:
            objective.distill.update_teacher(model.encoder.global_encoder)

    warmup_seconds = sum(run_times(step, device, warmup))  # compilation, with --compile
    step_times = run_times(step, device, steps)
    step_seconds = statistics.median(step_times)
    parts = {name: timed(fn, device, breakdown_repeats) for name, fn in part_steps(model, images, autocast).items()}
    parts["optimizer"] = timed(optimizer.step, device, breakdown_repeats)  # on the gradients the parts left
    optimizer.zero_grad(set_to_none=True)
    peak_memory = (
        torch.cuda.max_memory_allocated() if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    side = matmul_side or (8192 if device.startswith("cuda") else 1024)
    matmul = matmul_flops_per_second(device, matmul_dtype, side)
    achieved = flops / step_seconds
    accounted = sum(parts.values())
    result = {
        "bench": "throughput", "preset_image_size": model.config.image_size, "tokens_per_image": model.config.num_tokens,
        "lm": model.config.lm_name, "lm_weights": lm_weights, "codebook_size": model.codebook.size,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads",
        "precision": precision, "compile": compile, "batch_size": batch_size, "steps": steps,
        "images_per_s": round(batch_size / step_seconds, 2), "step_s": round(step_seconds, 4),
        "step_s_min": round(min(step_times), 4), "step_s_max": round(max(step_times), 4),
        "warmup_s": round(warmup_seconds, 2),
        "gflops_per_image": round(flops / batch_size / 1e9, 4),
        "gflops_per_image_by_part": {k: round(v / batch_size / 1e9, 4) for k, v in part_flops.items()},
        "achieved_tflops": round(achieved / 1e12, 4),
        "matmul": {"side": side, "dtype": str(matmul_dtype).replace("torch.", ""), "tflops": round(matmul / 1e12, 4)},
        "utilisation_vs_matmul": round(achieved / matmul, 4),
        "peak_memory_gb": round(peak_memory / 1e9, 3),
        "breakdown_s": {k: round(v, 4) for k, v in parts.items()},
        "breakdown_share_of_step": {k: round(v / step_seconds, 3) for k, v in parts.items()},
        "other_s": round(step_seconds - accounted, 4),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_avg": round(os.getloadavg()[0], 2),
    }
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = round(achieved / (peak_tflops * 1e12), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder, as --compile")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (per device)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak at this precision")
    parser.add_argument("--stand-in-lm", action="store_true", help="random roberta-base-shaped LM (for base/paper)")
    parser.add_argument("--matmul-side", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    logging.getLogger("lqae").setLevel(logging.ERROR)
    preset = get_preset(args.preset)
    result = measure(
        preset, args.batch_size or preset.train.batch_size, args.device, args.precision, args.compile,
        args.steps, args.warmup, args.peak_tflops, args.stand_in_lm, args.matmul_side,
    )
    result["preset"] = args.preset
    print(json.dumps(result))


if __name__ == "__main__":
    main()
