"""Progress bars on stderr, with one rule for when to draw them: for a person at a terminal."""

from __future__ import annotations

import sys
from typing import Callable


def wanted(quiet: bool, total: int = 2) -> bool:
    """Bars are for a person watching a terminal: not with --quiet, not for a single item, not when
    stderr goes to a file or a pipe (scripts and logs get no control sequences)."""
    return not quiet and total > 1 and sys.stderr.isatty()


class Bars:
    """Transient bars on stderr, one per stage, created on first use. Disabled, every call does nothing.

    `bars(stage, advanced, total)` is the library's progress callback; `bars.counter(stage, total)`
    gives an `advance(n)`; `bars.update(...)` sets a bar's position and status text; `bars.note(text)`
    prints a line above them. stdout is never routed through the display (it carries results)."""

    def __init__(self, enabled: bool, transient: bool = True) -> None:
        self.enabled = enabled
        self._tasks: dict[str, int] = {}
        self._display = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )

            self._display = Progress(
                TextColumn("[bold]{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=Console(stderr=True),
                transient=transient, redirect_stdout=False, redirect_stderr=False,
            )

    def __enter__(self) -> "Bars":
        if self._display is not None:
            self._display.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self._display is not None:
            return bool(self._display.__exit__(*exc))
        return False

    def _task(self, stage: str, total: int) -> int | None:
        if self._display is None:
            return None
        if stage not in self._tasks:
            self._tasks[stage] = self._display.add_task(stage, total=total, status="")
        return self._tasks[stage]

    def __call__(self, stage: str, advanced: int, total: int) -> None:
        task = self._task(stage, total)
        if task is not None:
            self._display.advance(task, advanced)

    def counter(self, stage: str, total: int) -> Callable[[int], None]:
        return lambda advanced: self(stage, advanced, total)

    def update(self, stage: str, completed: int, total: int, status: str = "") -> None:
        task = self._task(stage, total)
        if task is not None:
            self._display.update(task, completed=completed, total=total, status=status)

    def note(self, text: str) -> None:
        if self._display is not None:
            self._display.console.print(text, markup=False, highlight=False)
