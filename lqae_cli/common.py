"""CLI plumbing every command uses: library errors as one stderr line, logging to stderr, safe PATH<TAB> lines."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import unicodedata
from typing import Callable

import typer

from lqae.errors import DataError, LQAEError

DEBUG_ENV = "LQAE_DEBUG"


def printable(text: str) -> str:
    """`text` with control characters (line breaks, tabs, terminal escapes) written as escapes, so a
    file or class name can neither split a message line nor drive the terminal."""
    return "".join(c if unicodedata.category(c) not in _CONTROL else ascii(c)[1:-1] for c in text)


_CONTROL = ("Cc", "Cf", "Zl", "Zp")


def error_line(message: str) -> None:
    sys.stderr.write(f"error: {printable(message)}\n")
    sys.stderr.flush()


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into one stderr line and a non-zero exit; tracebacks only with LQAE_DEBUG=1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130)
        except BrokenPipeError:  # `lqae encode ... | head`: the reader left, nothing to report
            try:
                sys.stdout = open(os.devnull, "w")
            finally:
                raise typer.Exit(0)
        except Exception as exc:  # noqa: BLE001 - the one place every failure becomes one line
            if os.environ.get(DEBUG_ENV) == "1":
                traceback.print_exc()
            if isinstance(exc, LQAEError):
                error_line(str(exc))
                raise typer.Exit(exc.exit_code)
            error_line(f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
            raise typer.Exit(1)

    return wrapper


class _PrintableFormatter(logging.Formatter):
    """Log lines with their control characters escaped (`printable`): one line per message."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners swap it between invocations)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    level = logging.DEBUG if os.environ.get(DEBUG_ENV) == "1" else logging.WARNING
    root = logging.getLogger("lqae")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def check_line_paths(paths, instead: str) -> None:
    """PATH<TAB>VALUE lines cannot carry a file name holding a tab, a line break or another control
    character (a terminal escape would reach whoever reads the output): refuse before anything is
    printed, naming the file (escaped) and the safe alternative."""
    for path in paths:
        text = str(path)
        if any(unicodedata.category(c) in _CONTROL for c in text):
            raise DataError(
                f"file name {printable(text)} holds a tab, line break or other control character, which "
                f"PATH<TAB>... output lines cannot carry; {instead}"
            )
