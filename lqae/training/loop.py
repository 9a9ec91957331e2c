"""The training loop of `lqae train`: build a run, then step it (accumulation, bf16 on CUDA, DDP via
torchrun), and after each step what is due: a log line, a checkpoint, sample grids, validation.

The loop never prints: it writes metrics.jsonl and sample grids into the run folder and reports
through callbacks (the CLI draws a progress bar from them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from lqae import checkpoint as ckpt
from lqae.images.augment import to_float
from lqae.callbacks import TrainCallback, TrainInfo
from lqae.config import ModelConfig, TrainConfig
from lqae.presets import resumed_configs
from lqae.images.files import ImageFolder
from lqae.training.data import EpochBatchSampler, TrainDataset
from lqae.distributed import any_rank, setup_distributed, teardown_distributed
from lqae.errors import CheckpointError, ConfigError
from lqae.model.autoencoder import LQAE
from lqae.model.lm import load_frozen_lm
from lqae.reconstruction import evaluate_reconstruction
from lqae.run_folder import CONFIG_FILE, LOCK_FILE, METRICS_FILE, SAMPLES_DIR
from lqae.run_lock import RunLock
from lqae.images.source import scan_images
from lqae.training import parts
from lqae.training.objective import Objective
from lqae.training.record import write_data_record

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
    seconds_per_step: float = 0.0  # the mean over this process's steps (a resume: since it resumed)
    fingerprint: str | None = None  # of the last checkpoint's weights


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
    """Train an LQAE on an image folder or tar shards, writing checkpoints, metrics and sample
    grids to `run_dir`.

    Rank 0 holds the run folder's lock throughout (a second trainer on the same folder is refused)
    and owns any checkpoint journal a killed run left there.

    `resume` continues the checkpoint in `run_dir` with its saved configuration; the given configs
    may change only its bookkeeping (steps, logging and saving intervals, workers), and any other
    difference is a ConfigError (`asked`: the field paths the caller chose, e.g. the command line's
    options; None compares every field). The training data must be the data it was trained on.

    A loss or gradient norm that turns NaN or infinite stops training with a TrainingError (found
    where the loop syncs anyway: at a log line and before a save); non-finite weights are never saved."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    created = lock is not None and not run_dir.exists()
    try:
        if lock is not None:  # claimed first: whatever is checked below holds until the run ends
            lock.acquire()
            ckpt.roll_forward(run_dir)
        rank, world, device = setup_distributed(device)
        resumed = None
        if resume:
            model_config, train_config, resumed = _resumed(run_dir, model_config, train_config, asked)
        else:
            _check_new_run_folder(run_dir)
        run = _build(run_dir, data_dir, val_dir, resumed, model_config, train_config, device, rank, world)
        if run.is_main:
            _start(run, resumed is not None, list(callbacks), lock)
        return _loop(run)
    finally:
        if lock is not None:
            lock.release()
            if created:
                _remove_if_unused(run_dir)


def _check_new_run_folder(run_dir: Path) -> None:
    """A new run goes into a new or empty folder: never over a checkpoint, and never into a folder
    of someone's files, whose data.json and metrics.jsonl it would replace or append to."""
    entries = sorted(set(os.listdir(run_dir)) - {LOCK_FILE}) if run_dir.is_dir() else []
    if CONFIG_FILE in entries:
        raise CheckpointError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if entries:
        raise CheckpointError(
            f"{run_dir} is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}) and holds no "
            "checkpoint; a new run needs a new or empty --out"
        )


def _remove_if_unused(run_dir: Path) -> None:
    """The run folder this process made, removed again when nothing but its lock went in (a run
    that failed before it began), so the same command can be run again."""
    try:
        if set(os.listdir(run_dir)) <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


@dataclass
class _Resumed:
    """The checkpoint `--resume` continues: its step and the training state saved beside its weights."""

    step: int
    tensors: dict[str, torch.Tensor]  # the optimiser's state (and the teacher's, under DISTILL_PREFIX)
    meta: dict


def _resumed(
    run_dir: Path, model_config: ModelConfig, train_config: TrainConfig, asked: set[str] | None
) -> tuple[ModelConfig, TrainConfig, _Resumed]:
    """The saved configs (the given ones may change only bookkeeping) and the state to continue."""
    saved = ckpt.read_saved_config(run_dir)
    if saved.unresumable:
        raise CheckpointError(
            f"{run_dir} was trained with options removed after lqae {ckpt.LEGACY_VERSION} "
            f"({', '.join(saved.unresumable)}): it encodes and decodes, but training cannot go on as it was; "
            "train a new run, or resume it with that version"
        )
    model_config, train_config = resumed_configs(saved.model, saved.train, model_config, train_config, asked)
    tensors, meta, state_step = ckpt.load_train_state(run_dir)
    if state_step != saved.step:
        raise CheckpointError(f"{run_dir}: weights are at step {saved.step} but training state at {state_step}")
    return model_config, train_config, _Resumed(saved.step, tensors, meta)


@dataclass
class _Run:
    """One training run: what `_build` makes, then the loop's state, advanced a step at a time."""

    run_dir: Path
    config: TrainConfig
    device: str
    rank: int
    world: int  # processes (torchrun ranks)
    folder: ImageFolder  # the training images
    val_folder: ImageFolder | None
    total_steps: int
    micro_batch: int  # images of one forward pass on one rank
    model: LQAE
    objective: Objective  # the model, the mask, the MLM head and the self-distillation teacher
    optimizer: torch.optim.AdamW
    wrapped: torch.nn.Module | None  # the objective, or its DDP wrapper; None once closed
    loader: torch.utils.data.DataLoader | None  # None once closed
    step: int  # steps done so far
    result: TrainResult
    sample_images: torch.Tensor  # (8, C, H, W) the images of every sample grid
    autocast: contextlib.AbstractContextManager
    trainable: list[torch.nn.Parameter]  # the parameters the optimiser updates
    window: parts.Window  # the metrics since the last log line
    health: parts.Health
    stop: parts.SignalFlag = field(default_factory=parts.SignalFlag)
    callbacks: list[TrainCallback] = field(default_factory=list)  # rank 0's; none on the other ranks
    batches: Iterator[torch.Tensor] | None = None  # the loader's iterator, from the first step on
    started_at: int = 0  # the step this process started from
    seconds: float = 0.0  # spent in steps so far by this process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Drop the DDP wrapper and the loader (its reducer must go before its process group does)."""
        self.wrapped = self.batches = self.loader = None
        teardown_distributed(self.world)


def _build(
    run_dir: Path, data_dir, val_dir, resumed: _Resumed | None, model_config: ModelConfig, train_config: TrainConfig,
    device: str, rank: int, world: int,
) -> _Run:
    """The data, the model (restored when resuming), the objective, the optimiser, the loader."""
    start_step = resumed.step if resumed is not None else 0
    folder = scan_images(data_dir)  # an image folder or tar shards
    val_folder = scan_images(val_dir) if val_dir else None
    steps = parts.total_steps(train_config, len(folder))
    if start_step >= steps:
        raise ConfigError(f"checkpoint is already at step {start_step} of {steps}; pass a larger --steps to go on")
    micro_batch, remainder = divmod(train_config.batch_size, world * train_config.grad_accum)
    if remainder or micro_batch < 1:
        raise ConfigError(
            f"batch size {train_config.batch_size} must be divisible by {world} processes x "
            f"{train_config.grad_accum} accumulation steps"
        )

    torch.manual_seed(train_config.seed)
    # with its MLM head where the mask may use it: the seed's draws (the head's initialisation where
    # the LM has none) are part of what a seed means, so runs repeat across versions
    lm = load_frozen_lm(model_config.lm_name, with_mlm_head=train_config.mask.mlm_weight > 0)
    model = LQAE(model_config, lm=lm).to(device)
    if resumed is not None:
        model.load_trainable_state_dict(ckpt.load_trainable_from(run_dir))
    objective = Objective(model, train_config, lm.mlm_head).to(device).train()
    if objective.distill is not None and resumed is not None:
        _restore_teacher(objective, resumed)
    if train_config.compile:
        model.encoder.compile()
        model.decoder.compile()
    optimizer = parts.build_optimizer(model, train_config)
    if resumed is not None:
        ckpt.restore_optimizer(optimizer, resumed.tensors, resumed.meta.get("optimizer", {}))
    wrapped = parts.wrap_ddp(objective, device) if world > 1 else objective

    sampler = EpochBatchSampler(len(folder), micro_batch * train_config.grad_accum, train_config.seed, start_step, rank, world)
    dataset = TrainDataset(
        folder, model_config.image_size, train_config.crop_scale_min, train_config.hflip,
        views=2 if objective.distill else 1,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=parts.num_workers(train_config.num_workers, device),
        pin_memory=device.startswith("cuda"), persistent_workers=False,
    )
    return _Run(
        run_dir=run_dir, config=train_config, device=device, rank=rank, world=world, folder=folder,
        val_folder=val_folder, total_steps=steps, micro_batch=micro_batch, model=model, objective=objective,
        optimizer=optimizer, wrapped=wrapped, loader=loader, step=start_step, result=TrainResult(start_step),
        sample_images=parts.sample_batch(val_folder or folder, model_config.image_size).to(device),
        autocast=parts.autocast(train_config.precision, device),
        trainable=[p for p in model.parameters() if p.requires_grad],
        window=parts.Window(model.codebook.size, train_config.commitment_weight),
        health=parts.Health(device, start_step), started_at=start_step,
    )


def _restore_teacher(objective: Objective, resumed: _Resumed) -> None:
    """The self-distillation teacher as the checkpoint saved it (0.1.0's unused centre dropped)."""
    saved = {k[len(DISTILL_PREFIX):]: v for k, v in resumed.tensors.items() if k.startswith(DISTILL_PREFIX)}
    saved.pop("centre", None)
    if set(saved) != set(objective.distill.state_dict()):
        raise CheckpointError("the training state holds no self-distillation teacher for the global tokens")
    objective.distill.load_state_dict(saved)


def _start(run: _Run, resume: bool, callbacks: list[TrainCallback], lock: RunLock | None) -> None:
    """Rank 0: the run folder made and claimed, its data record written, the callbacks told."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None and lock.handle is None:
        lock.acquire()  # a new run folder: claimed now that it exists
    write_data_record(run.run_dir, run.folder, run.val_folder, resume=resume)
    run.callbacks = callbacks
    model, folder = run.model, run.folder
    info = TrainInfo(
        total_steps=run.total_steps, start_step=run.step, images=len(folder), skipped=len(folder.skipped),
        classes=len(folder.classes), codebook_size=model.codebook.size, tokens_per_image=model.layout.length,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=run.device, world_size=run.world, peak_lr=run.config.peak_lr, base_lr=run.config.base_lr,
        precision=parts.resolve_precision(run.config.precision, run.device),
    )
    for cb in callbacks:
        cb.on_start(info)


def _loop(run: _Run) -> TrainResult:
    """Steps until the last; a signal saves and raises TrainingInterrupted at the end of its step."""
    run.batches = iter(run.loader)
    run.objective.train()
    with run.stop.installed():
        while run.step < run.total_steps:
            lr = _step(run)
            _after_step(run, lr)
    run.result.step = run.step
    run.result.seconds_per_step = run.seconds / max(1, run.step - run.started_at)
    run.close()
    return run.result


def _step(run: _Run) -> float:
    """One optimiser step over a global batch (accumulating its micro-batches); returns its lr."""
    config, step = run.config, run.step
    lr = parts.lr_at(step, run.total_steps, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    started = time.perf_counter()
    images = to_float(next(run.batches).to(run.device, non_blocking=True))  # (B, C, H, W) uint8 -> [0, 1]
    for micro, chunk in enumerate(images.split(run.micro_batch)):
        generator = torch.Generator(device=run.device).manual_seed(
            ((config.seed * 1_000_003 + step) * 64 + micro) * 1024 + run.rank
        )
        sync = micro == config.grad_accum - 1 or run.world == 1
        # with the self-distillation, (b, 2, C, H, W): two views of each image, the first reconstructed
        chunk, second_view = (chunk[:, 0], chunk[:, 1]) if run.objective.distill else (chunk, None)
        with run.autocast, (contextlib.nullcontext() if sync else run.wrapped.no_sync()):
            out, losses, loss = run.wrapped(chunk, second_view, generator)
        (loss / config.grad_accum).backward()
        run.window.add(out, losses, loss, chunk)
        run.health.watch(step + 1, loss)
    run.health.watch(step + 1, parts.grad_norm(run.trainable, config.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.objective.distill:
        run.objective.distill.update_teacher(run.model.encoder.global_encoder)
    run.step += 1
    elapsed = time.perf_counter() - started
    run.window.time += elapsed
    run.window.steps += 1
    run.seconds += elapsed
    return lr


def _after_step(run: _Run, lr: float) -> None:
    """The log line, a checkpoint (scheduled, or on a signal, which then stops), sample grids and
    validation, each when due. Validation comes after the save: a failing pass loses no steps."""
    config, step = run.config, run.step
    if _due(step, config.log_every, run.total_steps):
        metrics = run.window.summary(step, lr, run.micro_batch * config.grad_accum * run.world)
        run.result.last_metrics = metrics
        run.window = parts.Window(run.model.codebook.size, config.commitment_weight)
        if run.is_main:
            parts.append_jsonl(run.run_dir / METRICS_FILE, metrics)
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
    try:  # one process: a signal here stops at once, after a save if this step has none (several wait for the step)
        with run.stop.interruptible() if run.world == 1 else contextlib.nullcontext():
            _samples_and_validation(run)
    except parts.Stopped:
        if run.health.saved != step:
            _save(run)
        run.close()
        raise TrainingInterrupted(run.stop.signum or signal.SIGTERM, step) from None


def _samples_and_validation(run: _Run) -> None:
    """The sample grid and the validation pass, when due: they change no weight, so a signal may cut them."""
    config, step = run.config, run.step
    if run.is_main and _due(step, config.sample_every, run.total_steps):
        grid = run.run_dir / SAMPLES_DIR / f"step_{step:07d}.png"
        parts.save_samples(run.model, run.sample_images, grid)
        run.objective.train()
        for cb in run.callbacks:
            cb.on_samples(step, grid)
    if run.val_folder is not None and run.is_main and _due(step, config.val_every, run.total_steps):
        report, _, _ = evaluate_reconstruction(run.model, run.val_folder)
        run.objective.train()
        run.result.validation = {"step": step, **{f"val_{k}": v for k, v in report.as_dict().items()}}
        parts.append_jsonl(run.run_dir / METRICS_FILE, run.result.validation)
        for cb in run.callbacks:
            cb.on_validation(step, run.result.validation)


def _due(step: int, every: int, total: int) -> bool:
    """Whether something done every `every` steps (and after the last) is due after `step`."""
    return step % every == 0 or step == total


def _save(run: _Run) -> None:
    """The checkpoint of this step: weights, configs and training state (rank 0 writes; all wait)."""
    if run.is_main:
        tensors, meta = ckpt.optimizer_state_tensors(run.optimizer)
        if run.objective.distill is not None:
            tensors.update({DISTILL_PREFIX + k: v for k, v in run.objective.distill.state_dict().items()})
        run.result.fingerprint = ckpt.save_checkpoint(
            run.run_dir, run.model, run.config, run.step, tensors, {"optimizer": meta}
        )
    if run.world > 1:
        torch.distributed.barrier()
