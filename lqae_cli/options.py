"""Options several commands share, declared once as `Annotated` types, the choice enums built from
the library's own constants, and the one way a command loads a checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from lqae.errors import ConfigError

MODEL_ENV = "LQAE_MODEL"

ModelOption = Annotated[
    Optional[Path],
    typer.Option(
        "--model", "-m", envvar=MODEL_ENV,
        help=f"Checkpoint folder written by `lqae train`, or a hub id org/name\\[@rev] (default: ${MODEL_ENV}).",
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary on stderr.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
AllowForeignOption = Annotated[
    bool,
    typer.Option(
        "--allow-foreign-tokens",
        help="Use token datasets written by other weights than the model's (or than each other's); ids of two "
        "checkpoints are unrelated, so only for people who know why they match.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else on stdout.")]


def choice_enum(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum for Typer from a library tuple of allowed values (`similar-last` becomes member `similar_last`)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


def resolve_device(name: str) -> str:
    """auto -> cuda when available, else cpu; an unavailable cuda is a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return name


def load_run(model: Optional[Path], device: str, encode_only: bool = False, lm: Optional[str] = None):
    """The model of a checkpoint folder or hub id (--model, else $LQAE_MODEL), in eval mode on `device`;
    `encode_only` skips the LM's layers (see `checkpoint.load_model`), `lm` replaces its LM name."""
    from lqae.checkpoint import load_model

    if model is None:
        raise ConfigError(f"no model given: pass --model RUN_DIR (a folder written by `lqae train`) or set {MODEL_ENV}")
    return load_model(model, resolve_device(device), lm_name=lm, encode_only=encode_only)
