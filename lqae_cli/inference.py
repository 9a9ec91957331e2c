"""Shared by `lqae encode` and `lqae decode`: the --model option, model loading, a progress bar."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

MODEL_ENV = "LQAE_MODEL"


def load_run(model: Optional[Path], device: str, encode_only: bool = False):
    """The model of a checkpoint folder (--model, else $LQAE_MODEL), in eval mode on `device`;
    `encode_only` skips the LM's layers (see `checkpoint.load_model`)."""
    from lqae.checkpoint import load_model
    from lqae.errors import ConfigError
    from lqae_cli.common import resolve_device

    if model is None:
        raise ConfigError(f"no model given: pass --model RUN_DIR (a folder written by `lqae train`) or set {MODEL_ENV}")
    return load_model(model, resolve_device(device), encode_only=encode_only)


@contextlib.contextmanager
def count_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr over `total` items; yields `advance(n)`. Hidden when disabled."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    from rich.console import Console

    progress = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=True,
        redirect_stdout=False, redirect_stderr=False,  # stdout carries the tokens: never route it through the bar
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def show_progress(quiet: bool, total: int) -> bool:
    """A bar is worth drawing for a person watching several images go by on a terminal."""
    return not quiet and total > 1 and sys.stderr.isatty()
