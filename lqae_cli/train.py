"""`lqae train`: train an LQAE on an image folder."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from lqae_cli.common import handle_errors, resolve_device


class PresetName(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"
    paper = "paper"


class Vocab(str, Enum):
    all = "all"
    words = "words"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class TrackerName(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


@handle_errors
def train(
    data_dir: Path = typer.Argument(..., help="Image folder: flat, or one sub-folder per class (png/jpg/webp/bmp)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint, metrics.jsonl, samples/."),
    preset: PresetName = typer.Option(PresetName.tiny, help="Named configuration (see README)."),
    lm: Optional[str] = typer.Option(None, help="Frozen LM: local folder or HF hub name (default: the preset's)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps (default: the preset's steps or epochs)."),
    epochs: Optional[float] = typer.Option(None, min=0.01, help="Epochs, used when --steps is not given."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per optimiser step over all devices."),
    grad_accum: Optional[int] = typer.Option(None, min=1, help="Micro-batches per optimiser step."),
    lr: Optional[float] = typer.Option(None, help="Base lr; peak lr = base lr x batch size / 256."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Square image side in pixels."),
    patch_size: Optional[int] = typer.Option(None, min=1, help="ViT patch side; must divide the image size."),
    vocab: Optional[Vocab] = typer.Option(None, help="Codebook: all non-special tokens, or whole words only."),
    mask_ratio: Optional[float] = typer.Option(None, help="Training mask probability per token."),
    val: Optional[Path] = typer.Option(None, help="Held-out image folder for PSNR/SSIM/code-usage passes."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out exactly where it stopped."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (torchrun picks cuda:LOCAL_RANK)."),
    precision: Precision = typer.Option(Precision.auto, help="auto = bf16 autocast on CUDA, fp32 on CPU."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder and decoder."),
    workers: Optional[int] = typer.Option(None, min=0, help="Data-loading processes (default: from the CPU count)."),
    log_every: Optional[int] = typer.Option(None, min=1, help="Steps between metric lines in metrics.jsonl."),
    sample_every: Optional[int] = typer.Option(None, min=1, help="Steps between reconstruction grids."),
    save_every: Optional[int] = typer.Option(None, min=1, help="Steps between checkpoints."),
    val_every: Optional[int] = typer.Option(None, min=1, help="Steps between validation passes."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order, augmentation and masking."),
    overrides: list[str] = typer.Option([], "--set", help="Override any config field: --set mask_ratio=0.3 (repeatable)."),
    tracker: TrackerName = typer.Option(
        TrackerName.none, help="Also log metrics, sample grids and the config to tensorboard (RUN/tensorboard) or wandb.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train an LQAE on an image folder.

    Example: lqae train data/digits --out runs/digits --preset tiny --steps 300
    Any config field: lqae train data/digits --out runs/x --set encoder_output=linear --set mask_ratio_min=null
    Several GPUs: torchrun --nproc_per_node 4 -m lqae_cli train data/ --out runs/x --preset base
    """
    from lqae.config import apply_overrides, get_preset
    from lqae.train import TrainingInterrupted, train as run_training

    chosen = apply_overrides(get_preset(preset.value), overrides)
    model_overrides = {
        "lm_name": lm, "image_size": image_size, "patch_size": patch_size,
        "vocab": vocab.value if vocab else None, "mask_ratio": mask_ratio,
    }
    train_overrides = {
        "steps": steps, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "base_lr": lr,
        "precision": precision.value, "compile": compile or None, "num_workers": workers, "log_every": log_every,
        "sample_every": sample_every, "save_every": save_every, "val_every": val_every, "seed": seed,
    }
    if epochs is not None and steps is None:
        train_overrides["steps"] = None
        chosen.train.steps = None
    model_config = dataclasses.replace(chosen.model, **{k: v for k, v in model_overrides.items() if v is not None})
    train_config = dataclasses.replace(chosen.train, **{k: v for k, v in train_overrides.items() if v is not None})

    from lqae.config import to_dict
    from lqae.trackers import make_tracker
    from lqae_cli.progress import TrainProgress

    progress = TrainProgress(enabled=not quiet)
    logger = make_tracker(tracker.value, out, {"model": to_dict(model_config), "train": to_dict(train_config)})
    try:
        with progress:
            result = run_training(
                data_dir, out, model_config, train_config, val_dir=val, resume=resume,
                device=resolve_device(device), callbacks=[progress] + ([logger] if logger else []),
            )
    except TrainingInterrupted as exc:
        from lqae_cli.common import error_line

        error_line(str(exc))
        raise typer.Exit(128 + int(exc.signum))
    finally:
        if logger is not None:
            logger.close()
    progress.summary(result, out)
