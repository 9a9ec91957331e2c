"""`lqae train`: train an LQAE on an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lqae.callbacks import TrainCallback, TrainInfo
from lqae.config import PRECISIONS, VOCAB_CHOICES, to_dict
from lqae.presets import PRESETS, asked_fields, configure
from lqae.trackers import TRACKERS, make_tracker
from lqae_cli.common import error_line, handle_errors
from lqae_cli.options import DeviceOption, QuietOption, choice_enum, resolve_device
from lqae_cli.progress import Bars, wanted


PresetName = choice_enum("PresetName", PRESETS)
DEFAULT_PRESET = "tiny"
Vocab = choice_enum("Vocab", VOCAB_CHOICES)
Precision = choice_enum("Precision", PRECISIONS)
TrackerName = choice_enum("TrackerName", TRACKERS)


@handle_errors
def train(
    data_dir: Path = typer.Argument(
        ..., help="Image folder: flat, or one sub-folder per class (png/jpg/webp/bmp); or WebDataset tar shards "
        "(a .tar, a folder of .tar files, or shard-{000..009}.tar).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint, metrics.jsonl, samples/."),
    preset: Optional[PresetName] = typer.Option(
        None, help="Named configuration (default " + DEFAULT_PRESET + "; --resume keeps the run's): "
        + "; ".join(f"{name}: {preset.summary}" for name, preset in PRESETS.items()) + ".",
        show_default=False,
    ),
    lm: Optional[str] = typer.Option(None, help="Frozen LM: local folder or HF hub name (default: the preset's)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps (default: the preset's steps or epochs)."),
    epochs: Optional[float] = typer.Option(None, min=0.01, help="Epochs, used when --steps is not given."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per optimiser step over all devices."),
    grad_accum: Optional[int] = typer.Option(None, min=1, help="Micro-batches per optimiser step."),
    lr: Optional[float] = typer.Option(None, help="Base lr (the preset's base_lr); the peak lr is base lr x batch size / 256."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Square image side in pixels."),
    patch_size: Optional[int] = typer.Option(None, min=1, help="ViT patch side; must divide the image size."),
    vocab: Optional[Vocab] = typer.Option(None, help="Codebook: all non-special tokens, or whole words only."),
    mask_ratio: Optional[float] = typer.Option(None, help="Training mask probability per token (mask.ratio)."),
    val: Optional[Path] = typer.Option(None, help="Held-out image folder (or tar shards) for PSNR/SSIM/code-usage passes."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out exactly where it stopped."),
    device: DeviceOption = "auto",
    precision: Optional[Precision] = typer.Option(
        None, help="auto (the default) = bf16 autocast on a GPU with bf16 and on a CPU with "
        "AVX512-BF16 or AMX, else fp32; the banner says which.", show_default=False,
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder and decoder."),
    workers: Optional[int] = typer.Option(None, min=0, help="Data-loading processes (default: from the CPU count)."),
    log_every: Optional[int] = typer.Option(None, min=1, help="Steps between metric lines in metrics.jsonl."),
    sample_every: Optional[int] = typer.Option(None, min=1, help="Steps between reconstruction grids."),
    save_every: Optional[int] = typer.Option(None, min=1, help="Steps between checkpoints."),
    val_every: Optional[int] = typer.Option(None, min=1, help="Steps between validation passes."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order, augmentation and masking."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override any config field: --set global_tokens=4, --set distill.teacher_momentum=0.996 (repeatable).",
    ),
    tracker: TrackerName = typer.Option(
        TrackerName.none, help="Also log metrics, sample grids and the config to tensorboard (RUN/tensorboard) or wandb.",
    ),
    quiet: QuietOption = False,
) -> None:
    """Train an LQAE on an image folder or WebDataset tar shards.

    Example: lqae train data/digits --out runs/digits --preset tiny --steps 300
    Any config field: lqae train data/digits --out runs/x --set global_tokens=4 --set mask.ratio=0.3
    Several GPUs: torchrun --nproc_per_node 4 -m lqae_cli train data/ --out runs/x --preset base
    (each process takes cuda:LOCAL_RANK).
    Tar shards: lqae train /data/train-{000000..000146}.tar --out runs/x --preset base
    """
    from lqae.training import TrainingInterrupted, train as run_training

    options = dict(
        lm_name=lm, image_size=image_size, patch_size=patch_size, vocab=vocab.value if vocab else None,
        mask_ratio=mask_ratio, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, base_lr=lr,
        precision=precision.value if precision else None, compile=compile or None, num_workers=workers,
        log_every=log_every, sample_every=sample_every, save_every=save_every, val_every=val_every, seed=seed,
    )
    chosen = configure(preset.value if preset else DEFAULT_PRESET, overrides, **options)
    asked = None if preset else asked_fields(overrides, **options)  # what --resume compares with the run
    model_config, train_config = chosen.model, chosen.train
    display = TrainDisplay(quiet)
    logger = make_tracker(tracker.value, out, {"model": to_dict(model_config), "train": to_dict(train_config)})
    try:
        with display:
            result = run_training(
                data_dir, out, model_config, train_config, val_dir=val, resume=resume,
                device=resolve_device(device), callbacks=[display] + ([logger] if logger else []), asked=asked,
            )
    except TrainingInterrupted as exc:
        error_line(str(exc))
        raise typer.Exit(128 + int(exc.signum))
    finally:
        if logger is not None:
            logger.close()
    display.summary(result, out)


class TrainDisplay(TrainCallback):
    """What a person sees while training: a start line, a step bar with the latest metrics (at a
    terminal), validation lines and a summary; nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars = Bars(wanted(quiet), transient=False)

    def __enter__(self) -> "TrainDisplay":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self.bars.__exit__(*exc)

    def say(self, line: str) -> None:
        if self.quiet:
            return
        if self.bars.enabled:
            self.bars.note(line)
        else:
            typer.echo(line, err=True)

    def on_start(self, info: TrainInfo) -> None:
        self.total = info.total_steps
        classes = f"{info.classes} classes" if info.classes else "no class folders"
        skipped = f", {info.skipped} unreadable skipped" if info.skipped else ""
        self.say(
            f"{info.images} images ({classes}{skipped}), {info.tokens_per_image} tokens/image, codebook "
            f"{info.codebook_size:,} codes, {info.trainable_parameters / 1e6:.2f}M trainable parameters, "
            f"{info.device} x{info.world_size} {info.precision}, lr {info.base_lr:.2e} (peak {info.peak_lr:.2e} after warm-up)"
        )
        self.bars.update("train", info.start_step, info.total_steps)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        status = ""
        if metrics:
            status = (
                f"loss {metrics['loss']:.4f} rec {metrics['recon_loss']:.4f} com/rec {metrics['commit_recon_ratio']:.2g} "
                f"|z| {metrics['encoder_norm']:.3g} psnr {metrics['psnr']:.1f} codes {metrics['unique_codes']} "
                f"ppl {metrics['code_perplexity']:.0f} {metrics['sec_per_step']:.2f}s/step"
            )
        self.bars.update("train", step, self.total, status)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        self.say(
            f"step {step}: val psnr {metrics['val_psnr']:.2f} dB, ssim {metrics['val_ssim']:.3f}, "
            f"{metrics['val_unique_codes']} codes, perplexity {metrics['val_code_perplexity']:.1f}"
        )

    def summary(self, result, run_dir: Path) -> None:
        m = result.last_metrics
        line = f"done at step {result.step}: checkpoint in {run_dir} (weights fingerprint {result.fingerprint})"
        if m:
            line += f"; train psnr {m['psnr']:.2f} dB (augmented training batches), {result.seconds_per_step:.2f} s/step"
        if result.validation:
            line += f"; val psnr {result.validation['val_psnr']:.2f} dB, ssim {result.validation['val_ssim']:.3f}"
        self.say(line)
