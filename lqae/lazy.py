"""Lazy public names of a package: importing `lqae`, `lqae.probe` or `lqae.fewshot` stays cheap, and
torch loads only with the submodule that needs it (PEP 562 module `__getattr__`)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], object]]:
    """(`__all__`, `__getattr__`) for a package whose public names live in submodules: `modules` maps
    each submodule to the names it provides."""
    table = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}; it has: {', '.join(sorted(table))}")

    return sorted(table), __getattr__
