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
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lqae import checkpoint as ckpt
from lqae.callbacks import TrainCallback, TrainInfo
from lqae.augment import to_float
from lqae.config import ModelConfig, TrainConfig, resumed_configs, write_json
from lqae.data import EpochBatchSampler, ImageFolder, TrainDataset, image_batches
from lqae.model.distill import SelfDistillation
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
        rank, world, device = setup_distributed(device)
        resumed = None
        if resume:
            model_config, train_config, resumed = _resumed(run_dir, model_config, train_config, asked)
        elif (run_dir / ckpt.CONFIG_FILE).exists():
            raise CheckpointError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
            )
        sources = _Sources(data_dir, val_dir, resumed)
        run = _build(run_dir, sources, model_config, train_config, device, rank, world)
        if run.is_main:
            _start(run, sources, list(callbacks), lock)
        return _loop(run)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Resumed:
    """The checkpoint `--resume` continues: its step and the training state saved beside its weights."""

    step: int
    tensors: dict[str, torch.Tensor]  # the optimiser's state (and the teacher's, under DISTILL_PREFIX)
    meta: dict[str, Any]


def _resumed(
    run_dir: Path, model_config: ModelConfig, train_config: TrainConfig, asked: set[str] | None
) -> tuple[ModelConfig, TrainConfig, _Resumed]:
    """The saved configs (the given ones may change only bookkeeping) and the state to continue."""
    saved_model, saved_train, step = ckpt.read_config(run_dir)
    model_config, train_config = resumed_configs(saved_model, saved_train, model_config, train_config, asked)
    tensors, meta, state_step = ckpt.load_train_state(run_dir)
    if state_step != step:
        raise CheckpointError(f"{run_dir}: weights are at step {step} but training state at {state_step}")
    return model_config, train_config, _Resumed(step, tensors, meta)


@dataclass
class _Sources:
    """Where a run starts from: its images (a folder or tar shards each) and the checkpoint it resumes."""

    data_dir: str | Path
    val_dir: str | Path | None
    resumed: _Resumed | None  # None: a new run


@dataclass
class _Run:
    """One training run: what `_build` makes, then the loop's state, advanced a step at a time."""

    run_dir: Path
    model_config: ModelConfig
    config: TrainConfig
    device: str
    rank: int
    world: int  # processes (torchrun ranks)
    folder: ImageFolder  # the training images
    val_folder: ImageFolder | None
    total_steps: int
    micro_batch: int  # images of one forward pass on one rank
    model: LQAE
    distill: SelfDistillation | None  # the global tokens' self-distillation; None without them
    optimizer: torch.optim.AdamW
    wrapped: torch.nn.Module | None  # the model, or its DDP wrapper; None once closed
    loader: torch.utils.data.DataLoader | None  # None once closed
    sample_images: torch.Tensor  # (8, C, H, W) the images of every sample grid
    autocast: contextlib.AbstractContextManager
    trainable: list[torch.nn.Parameter]  # the parameters the optimiser updates
    step: int  # steps done so far
    result: TrainResult
    window: _Window  # the metrics since the last log line
    health: _Health
    stop: _SignalFlag
    callbacks: list[TrainCallback] = field(default_factory=list)  # rank 0's; none on the other ranks
    batches: Iterator[torch.Tensor] | None = None  # the loader's iterator, from the first step on

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Drop the DDP wrapper and the loader (its reducer must go before its process group does)."""
        self.wrapped = self.batches = self.loader = None
        teardown_distributed(self.world)


def _build(
    run_dir: Path, sources: _Sources, model_config: ModelConfig, train_config: TrainConfig, device: str, rank: int,
    world: int,
) -> _Run:
    """The data, the model (restored when resuming), its optimiser and the batches' loader."""
    resumed = sources.resumed
    start_step = resumed.step if resumed is not None else 0
    folder = scan_image_source(sources.data_dir)  # an image folder or tar shards
    val_folder = scan_image_source(sources.val_dir) if sources.val_dir else None
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
    if resumed is not None:
        model.load_trainable_state_dict(ckpt.load_trainable_from(run_dir))
    distill = _self_distillation(model, resumed)
    if train_config.compile:
        model.encoder.compile()
        model.decoder.compile()
    optimizer = build_optimizer(model, train_config)
    if resumed is not None:
        ckpt.restore_optimizer(optimizer, resumed.tensors, resumed.meta.get("optimizer", {}))
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
    return _Run(
        run_dir=run_dir, model_config=model_config, config=train_config, device=device, rank=rank, world=world,
        folder=folder, val_folder=val_folder, total_steps=steps, micro_batch=micro_batch, model=model,
        distill=distill, optimizer=optimizer, wrapped=wrapped, loader=loader,
        sample_images=_sample_batch(val_folder or folder, model_config.image_size).to(device),
        autocast=_autocast(train_config.precision, device),
        trainable=[p for p in model.parameters() if p.requires_grad], step=start_step,
        result=TrainResult(start_step), window=_Window(model.codebook.size, model_config),
        health=_Health(device, start_step), stop=_SignalFlag(),
    )


def _start(run: _Run, sources: _Sources, callbacks: list[TrainCallback], lock: ckpt.RunLock | None) -> None:
    """Rank 0: the run folder made and claimed, its data record written, the callbacks told."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None and lock.handle is None:
        lock.acquire()  # a new run folder: claimed now that it exists
    _write_data_record(run.run_dir, run.folder, run.val_folder, resume=sources.resumed is not None)
    run.callbacks = callbacks
    model, folder = run.model, run.folder
    info = TrainInfo(
        total_steps=run.total_steps, start_step=run.step, images=len(folder), skipped=len(folder.skipped),
        classes=len(folder.classes), codebook_size=model.codebook.size, tokens_per_image=run.model_config.num_tokens,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=run.device, world_size=run.world, peak_lr=run.config.peak_lr,
    )
    for cb in callbacks:
        cb.on_start(info)


def _loop(run: _Run) -> TrainResult:
    """Steps until the last; a signal saves and raises TrainingInterrupted at the end of its step."""
    run.batches = iter(run.loader)
    run.model.train()
    with run.stop.installed():
        while run.step < run.total_steps:
            lr = _step(run)
            _after_step(run, lr)
    run.result.step = run.step
    run.close()
    return run.result


def _step(run: _Run) -> float:
    """One optimiser step over a global batch (accumulating its micro-batches); returns its lr."""
    config, step = run.config, run.step
    lr = lr_at(step, run.total_steps, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    mask_scale = mask_scale_at(step, run.total_steps, config)
    started = time.perf_counter()
    images = to_float(next(run.batches).to(run.device, non_blocking=True))  # (B, C, H, W) uint8 -> [0, 1]
    for micro, chunk in enumerate(images.split(run.micro_batch)):
        generator = torch.Generator(device=run.device).manual_seed(
            ((config.seed * 1_000_003 + step) * 64 + micro) * 1024 + run.rank
        )
        sync = micro == config.grad_accum - 1 or run.world == 1
        # global tokens: (b, 2, C, H, W), two views of each image for the self-distillation
        views = {"second_view": chunk[:, 1], "distill": run.distill} if run.distill else {}
        chunk = chunk[:, 0] if run.distill else chunk  # (b, C, H, W): the view that is reconstructed
        with run.autocast, (contextlib.nullcontext() if sync else run.wrapped.no_sync()):
            out = run.wrapped(chunk, generator=generator, mask_scale=mask_scale, **views)
        (out.loss / config.grad_accum).backward()
        run.window.add(out, chunk)
        run.health.watch(step + 1, out.loss)
    run.health.watch(step + 1, _grad_norm(run.trainable, config.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.distill:
        run.distill.update_teacher(run.model.encoder.global_encoder, config.teacher_momentum)
    run.step += 1
    run.window.time += time.perf_counter() - started
    run.window.steps += 1
    return lr


def _after_step(run: _Run, lr: float) -> None:
    """The log line, a checkpoint (scheduled, or on a signal, which then stops), sample grids and
    validation, each when due. Validation comes after the save: a failing pass loses no steps."""
    config, step = run.config, run.step
    if _due(step, config.log_every, run.total_steps):
        metrics = run.window.summary(step, lr, run.micro_batch * config.grad_accum * run.world)
        run.result.last_metrics = metrics
        run.window = _Window(run.model.codebook.size, run.model_config)
        if run.is_main:
            _append_jsonl(run.run_dir / METRICS_FILE, metrics)
        run.health.check(run.run_dir, config, run.total_steps, run.world)
    for cb in run.callbacks:
        cb.on_step(step, run.result.last_metrics)
    signalled = run.stop.signum is not None
    interrupted = any_rank(signalled, run.device) if run.world > 1 else signalled
    if _due(step, config.save_every, run.total_steps) or interrupted:
        run.health.check(run.run_dir, config, run.total_steps, run.world)  # before a save: never non-finite weights
        _save(run)
        run.health.saved = step
        for cb in run.callbacks:
            cb.on_checkpoint(step, run.run_dir)
    if interrupted:
        run.close()
        raise TrainingInterrupted(run.stop.signum or signal.SIGTERM, step)
    if run.is_main and _due(step, config.sample_every, run.total_steps):
        grid = run.run_dir / SAMPLES_DIR / f"step_{step:07d}.png"
        _save_samples(run.model, run.sample_images, grid)
        run.model.train()
        for cb in run.callbacks:
            cb.on_samples(step, grid)
    if run.val_folder is not None and run.is_main and _due(step, config.val_every, run.total_steps):
        report, _, _ = evaluate_reconstruction(run.model, run.val_folder)
        run.model.train()
        run.result.validation = {"step": step, **{f"val_{k}": v for k, v in report.as_dict().items()}}
        _append_jsonl(run.run_dir / METRICS_FILE, run.result.validation)
        for cb in run.callbacks:
            cb.on_validation(step, run.result.validation)


def _due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (and after the last) is due after `step`."""
    return step % every == 0 or step == total


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


def _self_distillation(model: LQAE, resumed: _Resumed | None) -> SelfDistillation | None:
    """The global tokens' self-distillation state (teacher, centre), restored on resume; None
    without global tokens or with invariance_weight 0."""
    config = model.config
    if not config.global_tokens or config.invariance_weight <= 0:
        return None

    distill = SelfDistillation(model)
    if resumed is not None:
        saved = {k[len(DISTILL_PREFIX):]: v for k, v in resumed.tensors.items() if k.startswith(DISTILL_PREFIX)}
        if set(saved) != set(distill.state_dict()):
            raise CheckpointError("the training state holds no self-distillation teacher for the global tokens")
        distill.load_state_dict(saved)
    return distill.to(model.device).train()


def _save(run: _Run) -> None:
    """The checkpoint of this step: weights, configs and training state (rank 0 writes; all wait)."""
    if run.is_main:
        tensors, meta = ckpt.optimizer_state_tensors(run.optimizer)
        if run.distill is not None:
            tensors.update({DISTILL_PREFIX + k: v for k, v in run.distill.state_dict().items()})
        ckpt.save_checkpoint(run.run_dir, run.model, run.config, run.step, tensors, {"optimizer": meta})
    if run.world > 1:
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
