"""The pieces of a training run: the schedule, the optimiser, the metrics window between log lines,
the watch for a diverging loss, the signal flag, sample grids, precision, workers, DDP."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lqae.config import TrainConfig
from lqae.images.batches import image_batches
from lqae.images.files import ImageFolder
from lqae.errors import DataError, TrainingError
from lqae.images.output import comparison_grid, save_png
from lqae.io import writing
from lqae.metrics import psnr_tensor, usage_from_counts
from lqae.schedule import warmup_cosine


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak lr, then half-cosine down to 0."""
    peak = config.peak_lr
    return warmup_cosine(step, total, config.warmup_fraction, peak, 0.0)


def total_steps(config: TrainConfig, images: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * images / config.batch_size))


def build_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # MAE convention: no weight decay on biases, norms and position embeddings.
        (no_decay if param.ndim < 2 or name.endswith("position") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(config.beta1, config.beta2))


class Window:
    """Running sums of the metrics between two log lines, kept on the device: one host sync per
    log line, not several per step."""

    def __init__(self, codebook_size: int, commitment_weight: float) -> None:
        self.commitment_weight = commitment_weight
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.steps = 0
        self.time = 0.0
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None

    def add(self, out, losses, loss: torch.Tensor, images: torch.Tensor) -> None:
        """One forward pass: the model's output, the loss parts (`LossBreakdown`), the weighted loss."""
        parts = {
            "loss": loss, "recon_loss": losses.reconstruction, "commitment_loss": losses.commitment,
            "mlm_loss": losses.mlm, "invariance_loss": losses.invariance,
            "encoder_norm": out.encoder_norm, "psnr": psnr_tensor(out.reconstruction.detach(), images),
        }
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        counts = torch.bincount(out.quantized.codes.detach().flatten(), minlength=self.codebook_size)
        self.counts = counts if self.counts is None else self.counts + counts
        self.batches += 1

    def summary(self, step: int, lr: float, images_per_step: int) -> dict[str, float]:
        metrics: dict[str, Any] = {"step": step, "lr": lr}
        metrics.update({k: float(v) / max(1, self.batches) for k, v in self.sums.items()})
        counts = self.counts if self.counts is not None else torch.zeros(self.codebook_size, dtype=torch.long)
        metrics["unique_codes"], metrics["code_perplexity"] = usage_from_counts(counts.cpu())
        # weighted commitment over reconstruction: a growing ratio means the encoder output drifts
        metrics["commit_recon_ratio"] = self.commitment_weight * metrics.get("commitment_loss", 0.0) / max(
            1e-12, metrics.get("recon_loss", 0.0)
        )
        metrics["sec_per_step"] = self.time / max(1, self.steps)
        metrics["images_per_sec"] = images_per_step / max(1e-9, metrics["sec_per_step"])
        return metrics


class Health:
    """The first step whose loss or gradient norm was NaN or infinite, kept on the device: updated
    every step without a host sync, read (`check`) only where the loop syncs anyway."""

    def __init__(self, device: str, saved: int) -> None:
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self.saved = saved  # step of the last checkpoint in the run folder (0: none)

    def watch(self, step: int, value: torch.Tensor) -> None:
        self.first_bad.masked_fill_((self.first_bad == 0) & ~torch.isfinite(value.detach()).all(), step)

    def check(self, run_dir: Path, config: TrainConfig, total: int, world: int) -> None:
        first = self.first_bad.clone()
        if world > 1:  # every rank stops at the same step, or none does
            first.masked_fill_(first == 0, 2**62)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first.masked_fill_(first == 2**62, 0)
        bad = int(first.item())
        if not bad:
            return
        kept = (f"{run_dir} keeps its checkpoint of step {self.saved} (continue it with --resume and a change below)"
                if self.saved else "nothing was saved")
        raise TrainingError(
            f"training diverged: the loss or the gradient norm became NaN or infinite at step {bad} "
            f"(lr {lr_at(bad - 1, total, config):.3g}); {kept}; try a lower --lr, --set grad_clip=1.0"
            + (", or --precision fp32" if config.precision != "fp32" else "")
        )


def grad_norm(parameters: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The total gradient norm (on the device), clipping to `clip` when it is positive."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class Stopped(Exception):
    """A signal arrived while the loop was in an interruptible stretch (sample grids, validation)."""


class SignalFlag:
    """Remember SIGINT/SIGTERM instead of dying mid-step; the loop saves and stops at the step's end.
    Inside `interruptible()` (work after a step that changes no weight) a signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupting = False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        if self.interrupting:
            raise Stopped()

    @contextlib.contextmanager
    def interruptible(self):
        self.interrupting = True
        try:
            if self.signum is not None:
                raise Stopped()
            yield
        finally:
            self.interrupting = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def save_samples(model, images: torch.Tensor, path: Path) -> None:
    model.eval()  # eval statistics and no masking; the caller switches back to training
    recon = model.reconstruct(images)
    upscale = max(1, 128 // images.shape[-1])
    save_png(comparison_grid(images, recon), path, upscale=upscale)


def sample_batch(folder: ImageFolder, size: int, count: int = 8) -> torch.Tensor:
    step = max(1, len(folder) // count)  # spread over the folder (and so over classes)
    for _, images in image_batches(folder.paths[::step][:count], size, count, skip_unreadable=True):
        return images
    raise DataError(f"none of the images chosen for the sample grids in {folder.root} could be read")


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> bf16 where the hardware computes in bf16 (a CUDA device; a CPU with AVX512-BF16 or
    AMX), else fp32; bf16 and fp32 as given."""
    if precision != "auto":
        return precision
    native = torch.cuda.is_bf16_supported(including_emulation=False) if device.startswith("cuda") else cpu_computes_bf16()
    return "bf16" if native else "fp32"


@functools.lru_cache(maxsize=None)
def cpu_computes_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16). Without them autocast to bf16
    emulates it and is slower than fp32. False where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(precision: str, device: str):
    """bf16 autocast when `precision` resolves to bf16 on `device` (see `resolve_precision`), else nothing."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def num_workers(requested: int, device: str) -> int:
    if requested >= 0:
        return requested
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return min(8, cpus)
    return 0 if cpus <= 2 else min(4, cpus // 2)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line; a NaN or infinite value is written as null (bare NaN is not JSON)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with writing(path, "the lines before are kept"), open(path, "a") as handle:
        handle.write(json.dumps(finite, sort_keys=True, allow_nan=False) + "\n")


def wrap_ddp(model, device: str):
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # The codebook buffers are identical on every rank: no need to broadcast them each step.
    # (Newer torch renames the flag; the old name still works and exists on every supported version.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
