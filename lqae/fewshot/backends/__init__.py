"""LLM backends for few-shot classification, one module per `--llm` kind, behind one interface (`base`).

`--llm` forms: `hf:NAME_OR_PATH` (local transformers causal LM, GGUF included; `hf` alone is the
default model), `openai:MODEL` (any OpenAI-compatible server), `overlap` (no LLM: token-overlap
nearest neighbour). A kind's module is imported only when it is used, so importing this package
loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lqae.errors import ConfigError
from lqae.fewshot.backends.base import DEFAULT_HF_MODEL, Backend, BackendOptions, Request, match_label
from lqae.lazy import lazy_exports

DEFAULT_LLM = f"hf:{DEFAULT_HF_MODEL}"
LLM_FORMS = ("hf:NAME_OR_PATH", "openai:MODEL", "overlap")

# `--llm` kind -> (module, class) that builds it from the rest of the form
BACKENDS: dict[str, tuple[str, str]] = {
    "hf": ("lqae.fewshot.backends.hf", "HFBackend"),
    "openai": ("lqae.fewshot.backends.openai", "OpenAIBackend"),
    "overlap": ("lqae.fewshot.backends.overlap", "OverlapBackend"),
}

__all__ = [
    "BACKENDS", "DEFAULT_HF_MODEL", "DEFAULT_LLM", "LLM_FORMS", "Backend", "BackendOptions", "HFBackend",
    "OpenAIBackend", "OverlapBackend", "Request", "make_backend", "match_label",
]

_, __getattr__ = lazy_exports(__name__, {module: (name,) for module, name in BACKENDS.values()})

if TYPE_CHECKING:
    from lqae.fewshot.backends.hf import HFBackend
    from lqae.fewshot.backends.openai import OpenAIBackend
    from lqae.fewshot.backends.overlap import OverlapBackend


def make_backend(spec: str, options: BackendOptions | None = None) -> Backend:
    """A backend from its `--llm` form; an unknown form is answered with the known ones."""
    kind, _, target = spec.strip().partition(":")
    backend = None
    if kind in BACKENDS:
        backend = _backend_class(kind).from_llm(target, options or BackendOptions())
    if backend is None:
        raise ConfigError(f"unknown --llm {spec!r}; use one of: {', '.join(LLM_FORMS)} (default {DEFAULT_LLM})")
    return backend


def _backend_class(kind: str) -> type[Backend]:
    module, name = BACKENDS[kind]
    return getattr(importlib.import_module(module), name)
