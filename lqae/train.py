"""Training loop for `lqae train`: AdamW, warm-up + cosine, accumulation, bf16 on CUDA, DDP via torchrun.

The loop never prints: it writes metrics.jsonl and sample grids into the run folder and reports
through callbacks (the CLI draws a progress bar from them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lqae import checkpoint as ckpt
from lqae.callbacks import TrainCallback, TrainInfo
from lqae.augment import to_float
from lqae.config import ModelConfig, TrainConfig, resumed_configs, write_json
from lqae.data import EpochBatchSampler, ImageFolder, TrainDataset, image_batches
from lqae.distill import SelfDistillation
from lqae.distributed import any_rank, setup_distributed, teardown_distributed
from lqae.errors import CheckpointError, ConfigError, DataError, TrainingError
from lqae.reconstruction import evaluate_reconstruction
from lqae.run_folder import DATA_FILE, METRICS_FILE, SAMPLES_DIR
from lqae.images import comparison_grid, save_png
from lqae.io import writing
from lqae.metrics import psnr_tensor, usage_from_counts
from lqae.model import LQAE
from lqae.schedule import warmup_cosine
from lqae.shards import scan_image_source

log = logging.getLogger(__name__)

DISTILL_PREFIX = "distill."  # the self-distillation state's tensors in train_state.safetensors


class TrainingInterrupted(Exception):
    """Raised after a signal-triggered checkpoint; carries the signal number."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved, continue with --resume")
        self.signum, self.step = signum, step


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] | None = None


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak lr, then half-cosine down to min_lr_fraction x peak."""
    peak = config.peak_lr
    return warmup_cosine(step, total, config.warmup_fraction, peak, peak * config.min_lr_fraction)


def mask_scale_at(step: int, total: int, config: TrainConfig) -> float:
    """Fraction of the configured mask ratio in use at `step`: a linear ramp from 0 over
    mask_warmup_fraction of training, 1, then a linear ramp down to 0 over the last
    mask_cooldown_fraction (so the decoder ends on the unmasked sequences it meets at encode time)."""
    ramp_up, ramp_down = config.mask_warmup_fraction * total, config.mask_cooldown_fraction * total
    scale = 1.0 if ramp_up <= 0 else min(1.0, step / ramp_up)
    if ramp_down > 0:
        scale = min(scale, max(0.0, (total - step) / ramp_down))
    return scale


def total_steps(config: TrainConfig, images: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * images / config.batch_size))


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    val_dir: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    callbacks: list[TrainCallback] = (),
    asked: set[str] | None = None,
) -> TrainResult:
    """Train an LQAE on an image folder, writing checkpoints, metrics and sample grids to `run_dir`.

    Rank 0 holds the run folder's lock throughout (a second trainer on the same folder is refused)
    and owns any checkpoint journal a killed run left there.

    `resume` continues the checkpoint in `run_dir` with its saved configuration; the given configs
    may change only its bookkeeping (steps, logging and saving intervals, workers), and any other
    difference is a ConfigError (`asked`: the fields the caller chose, e.g. the command line's
    options; None compares every field). The training data must be the data it was trained on.

    A loss or gradient norm that turns NaN or infinite stops training with a TrainingError (found
    where the loop syncs anyway: at a log line and before a save); non-finite weights are never saved."""
    run_dir = Path(run_dir)
    lock = ckpt.RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        if lock is not None and run_dir.is_dir():
            lock.acquire()
            ckpt.roll_forward(run_dir)
        return _train(data_dir, run_dir, model_config, train_config, val_dir, resume, device, callbacks, lock, asked)
    finally:
        if lock is not None:
            lock.release()


def _train(
    data_dir, run_dir: Path, model_config, train_config, val_dir, resume, device, callbacks, lock, asked
) -> TrainResult:
    rank, world, device = setup_distributed(device)
    is_main = rank == 0
    callbacks = list(callbacks) if is_main else []

    start_step, train_tensors, train_meta = 0, None, {}
    if resume:
        saved_model, saved_train, start_step = ckpt.read_config(run_dir)
        model_config, train_config = resumed_configs(saved_model, saved_train, model_config, train_config, asked)
        train_tensors, train_meta, state_step = ckpt.load_train_state(run_dir)
        if state_step != start_step:
            raise CheckpointError(f"{run_dir}: weights are at step {start_step} but training state at {state_step}")
    elif (run_dir / ckpt.CONFIG_FILE).exists():
        raise CheckpointError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )

    folder = scan_image_source(data_dir)  # an image folder or tar shards
    val_folder = scan_image_source(val_dir) if val_dir else None
    steps = total_steps(train_config, len(folder))
    if start_step >= steps:
        raise ConfigError(f"checkpoint is already at step {start_step} of {steps}; pass a larger --steps to go on")
    micro_batch, remainder = divmod(train_config.batch_size, world * train_config.grad_accum)
    if remainder or micro_batch < 1:
        raise ConfigError(
            f"batch size {train_config.batch_size} must be divisible by {world} processes x "
            f"{train_config.grad_accum} accumulation steps"
        )

    torch.manual_seed(train_config.seed)

    model = LQAE(model_config).to(device)
    if train_tensors is not None:
        model.load_trainable_state_dict(ckpt.load_trainable_from(run_dir))
    distill = _self_distillation(model, train_tensors)
    if train_config.compile:
        model.encoder.compile()
        model.decoder.compile()
    optimizer = build_optimizer(model, train_config)
    if train_tensors is not None:
        ckpt.restore_optimizer(optimizer, train_tensors, train_meta.get("optimizer", {}))
    wrapped = _wrap_ddp(model, device) if world > 1 else model

    sampler = EpochBatchSampler(len(folder), micro_batch * train_config.grad_accum, train_config.seed, start_step, rank, world)
    dataset = TrainDataset(
        folder, model_config.image_size, train_config.crop_scale_min, train_config.hflip, views=2 if distill else 1
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=_num_workers(train_config.num_workers, device),
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
    )
    sample_images = _sample_batch(val_folder or folder, model_config.image_size).to(device)
    autocast = _autocast(train_config.precision, device)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock is not None and lock.handle is None:
            lock.acquire()  # a new run folder: claimed now that it exists
        _write_data_record(run_dir, folder, val_folder, resume)
        info = TrainInfo(
            total_steps=steps, start_step=start_step, images=len(folder), skipped=len(folder.skipped),
            classes=len(folder.classes), codebook_size=model.codebook.size, tokens_per_image=model_config.num_tokens,
            trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            device=device, world_size=world, peak_lr=train_config.peak_lr,
        )
        for cb in callbacks:
            cb.on_start(info)

    stop = _SignalFlag()
    result = TrainResult(start_step)
    window = _Window(model.codebook.size, model_config)
    health = _Health(device, start_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    model.train()
    step = start_step
    with stop.installed():
        while step < steps:
            lr = lr_at(step, steps, train_config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mask_scale = mask_scale_at(step, steps, train_config)
            started = time.perf_counter()
            images = to_float(next(batches).to(device, non_blocking=True))  # (B, C, H, W) uint8 -> [0, 1]
            for micro, chunk in enumerate(images.split(micro_batch)):
                generator = torch.Generator(device=device).manual_seed(
                    ((train_config.seed * 1_000_003 + step) * 64 + micro) * 1024 + rank
                )
                sync = micro == train_config.grad_accum - 1 or world == 1
                views = {"second_view": chunk[:, 1], "distill": distill} if distill else {}
                chunk = chunk[:, 0] if distill else chunk  # (b, C, H, W): the view that is reconstructed
                with autocast, (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    out = wrapped(chunk, generator=generator, mask_scale=mask_scale, **views)
                (out.loss / train_config.grad_accum).backward()
                window.add(out, chunk)
                health.watch(step + 1, out.loss)
            health.watch(step + 1, _grad_norm(trainable, train_config.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if distill:
                distill.update_teacher(model.encoder.global_encoder, train_config.teacher_momentum)
            step += 1
            window.time += time.perf_counter() - started
            window.steps += 1

            if step % train_config.log_every == 0 or step == steps:
                metrics = window.summary(step, lr, micro_batch * train_config.grad_accum * world)
                result.last_metrics = metrics
                window = _Window(model.codebook.size, model_config)
                if is_main:
                    _append_jsonl(run_dir / METRICS_FILE, metrics)
                health.check(run_dir, train_config, steps, world)
            if is_main:
                for cb in callbacks:
                    cb.on_step(step, result.last_metrics)
            interrupted = any_rank(stop.signum is not None, device) if world > 1 else stop.signum is not None
            if step % train_config.save_every == 0 or step == steps or interrupted:
                health.check(run_dir, train_config, steps, world)  # before a save: never non-finite weights
                _save(run_dir, model, train_config, step, optimizer, is_main, world, distill)
                health.saved = step
                for cb in callbacks:
                    cb.on_checkpoint(step, run_dir)
            if interrupted:
                del wrapped, batches, loader
                teardown_distributed(world)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step)
            # after the save: a failing validation pass loses no steps
            if is_main and (step % train_config.sample_every == 0 or step == steps):
                grid = run_dir / SAMPLES_DIR / f"step_{step:07d}.png"
                _save_samples(model, sample_images, grid)
                model.train()
                for cb in callbacks:
                    cb.on_samples(step, grid)
            if val_folder is not None and is_main and (step % train_config.val_every == 0 or step == steps):
                report, _, _ = evaluate_reconstruction(model, val_folder)
                model.train()
                result.validation = {"step": step, **{f"val_{k}": v for k, v in report.as_dict().items()}}
                _append_jsonl(run_dir / METRICS_FILE, result.validation)
                for cb in callbacks:
                    cb.on_validation(step, result.validation)
    result.step = step
    del wrapped, batches, loader  # DDP's reducer must go before its process group does
    teardown_distributed(world)
    return result


# -- pieces ---------------------------------------------------------------------------------------


class _Window:
    """Running sums of the metrics between two log lines, kept on the device: one host sync per
    log line, not several per step."""

    def __init__(self, codebook_size: int, model_config: ModelConfig) -> None:
        self.weights = (model_config.commitment_weight, model_config.recon_weight)
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.steps = 0
        self.time = 0.0
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None

    def add(self, out, images: torch.Tensor) -> None:
        parts = {
            "loss": out.loss, "recon_loss": out.losses.reconstruction, "commitment_loss": out.losses.commitment,
            "mlm_loss": out.losses.mlm, "usage_loss": out.losses.usage, "codebook_loss": out.losses.codebook,
            "invariance_loss": out.losses.invariance,
            "encoder_norm": out.encoder_norm, "psnr": psnr_tensor(out.reconstruction.detach(), images),
        }
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        counts = torch.bincount(out.codes.detach().flatten(), minlength=self.codebook_size)
        self.counts = counts if self.counts is None else self.counts + counts
        self.batches += 1

    def summary(self, step: int, lr: float, images_per_step: int) -> dict[str, float]:
        metrics: dict[str, Any] = {"step": step, "lr": lr}
        metrics.update({k: float(v) / max(1, self.batches) for k, v in self.sums.items()})
        counts = self.counts if self.counts is not None else torch.zeros(self.codebook_size, dtype=torch.long)
        metrics["unique_codes"], metrics["code_perplexity"] = usage_from_counts(counts.cpu())
        # weighted commitment over weighted reconstruction: a growing ratio means the encoder output drifts
        commitment_weight, recon_weight = self.weights
        metrics["commit_recon_ratio"] = commitment_weight * metrics.get("commitment_loss", 0.0) / max(
            1e-12, recon_weight * metrics.get("recon_loss", 0.0)
        )
        metrics["sec_per_step"] = self.time / max(1, self.steps)
        metrics["images_per_sec"] = images_per_step / max(1e-9, metrics["sec_per_step"])
        return metrics


class _Health:
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


def _grad_norm(parameters: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The total gradient norm (on the device), clipping to `clip` when it is positive."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class _SignalFlag:
    """Remember SIGINT/SIGTERM instead of dying mid-step; the loop saves and stops at the step's end."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

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


def build_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # MAE convention: no weight decay on biases, norms and position embeddings.
        (no_decay if param.ndim < 2 or name.endswith("position") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(config.beta1, config.beta2))


def _self_distillation(model, train_tensors: dict[str, torch.Tensor] | None):
    """The global tokens' self-distillation state (teacher, centre), restored on resume; None
    without global tokens or with invariance_weight 0."""
    config = model.config
    if not config.global_tokens or config.invariance_weight <= 0:
        return None

    distill = SelfDistillation(model)
    if train_tensors is not None:
        saved = {k[len(DISTILL_PREFIX):]: v for k, v in train_tensors.items() if k.startswith(DISTILL_PREFIX)}
        if set(saved) != set(distill.state_dict()):
            raise CheckpointError("the training state holds no self-distillation teacher for the global tokens")
        distill.load_state_dict(saved)
    return distill.to(model.device).train()


def _save(run_dir, model, config, step, optimizer, is_main, world, distill=None) -> None:
    if is_main:
        tensors, meta = ckpt.optimizer_state_tensors(optimizer)
        if distill is not None:
            tensors.update({DISTILL_PREFIX + k: v for k, v in distill.state_dict().items()})
        ckpt.save_checkpoint(run_dir, model, config, step, tensors, {"optimizer": meta})
    if world > 1:
        dist.barrier()


def _write_data_record(run_dir: Path, folder, val_folder, resume: bool) -> None:
    """RUN_DIR/data.json: which images trained the model (the model card reports them). A resumed
    run must train on the data the record names (else a DataError); a changed --val is recorded,
    with a warning."""
    def describe(found) -> dict:
        return {"folder": str(found.root), "name": Path(found.root).resolve().name, "images": len(found),
                "classes": list(found.classes), "skipped": len(found.skipped), "digest": _data_digest(found)}

    record = {"train": describe(folder), "val": describe(val_folder) if val_folder is not None else None}
    previous = _read_record(run_dir / DATA_FILE) if resume else None
    if previous and previous.get("train"):
        _check_same_data(previous["train"], record["train"], run_dir)
        record["train"] = previous["train"]  # the same images: the record stays as it was written
        before = previous.get("val")
        if record["val"] and before and before.get("digest") != record["val"]["digest"]:
            log.warning("%s: validating on %s from now on (it was validated on %s)", run_dir,
                        record["val"]["folder"], before.get("folder"))
        record["val"] = record["val"] or before
    write_json(run_dir / DATA_FILE, record)


def _data_digest(found) -> str:
    """A short id of an image folder's content as training sees it: classes, and each image's path
    inside the folder and size (moving the folder keeps it; adding, removing or replacing an image does not)."""
    digest = hashlib.sha256(json.dumps(list(found.classes)).encode())
    for path, label in zip(found.paths, found.labels):
        if hasattr(path, "open_bytes"):  # a tar shard's member: its name and size inside the shard
            where, size = f"{Path(path.shard).name}/{path.name}", path.size
        else:
            where, size = Path(path).relative_to(found.root).as_posix(), os.path.getsize(path)
        digest.update(f"{where}\0{size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def _check_same_data(recorded: dict, current: dict, run_dir: Path) -> None:
    if "digest" in recorded:
        same = recorded["digest"] == current["digest"]
    else:  # a record from before digests: folder, count and classes
        same = (Path(recorded.get("folder", "")).resolve(), recorded.get("images"), recorded.get("classes")) == (
            Path(current["folder"]).resolve(), current["images"], current["classes"])
    if not same:
        raise DataError(
            f"{run_dir} was trained on {recorded.get('folder')} ({recorded.get('images')} images); {current['folder']} "
            f"({current['images']} images) holds other data: resume on the same images, or train a new --out"
        )


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_samples(model, images: torch.Tensor, path: Path) -> None:
    model.eval()  # eval statistics and no masking; the caller switches back to training
    recon = model.reconstruct(images)
    upscale = max(1, 128 // images.shape[-1])
    save_png(comparison_grid(images, recon), path, upscale=upscale)


def _sample_batch(folder: ImageFolder, size: int, count: int = 8) -> torch.Tensor:
    step = max(1, len(folder) // count)  # spread over the folder (and so over classes)
    for _, images in image_batches(folder.paths[::step][:count], size, count, skip_unreadable=True):
        return images
    raise DataError(f"none of the images chosen for the sample grids in {folder.root} could be read")


def _autocast(precision: str, device: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.startswith("cuda"))
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def _num_workers(requested: int, device: str) -> int:
    if requested >= 0:
        return requested
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return min(8, cpus)
    return 0 if cpus <= 2 else min(4, cpus // 2)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON object per line; a NaN or infinite value is written as null (bare NaN is not JSON)."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with writing(path, "the lines before are kept"), open(path, "a") as handle:
        handle.write(json.dumps(finite, sort_keys=True, allow_nan=False) + "\n")


def _wrap_ddp(model, device: str):
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # The codebook buffers are identical on every rank: no need to broadcast them each step.
    # (Newer torch renames the flag; the old name still works and exists on every supported version.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
