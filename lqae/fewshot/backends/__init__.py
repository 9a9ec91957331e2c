"""LLM backends for few-shot classification, one module per `--llm` kind, behind one interface (`base`).

`--llm` forms: `auto` (the default, `resolve_llm`: an LLM server the environment names, else the
overlap baseline), `hf:NAME_OR_PATH` (local transformers causal LM, GGUF included; `hf` alone is
SmolLM2-135M), `openai:MODEL` (any OpenAI-compatible server), `overlap` (no LLM: token-overlap
nearest neighbour). A kind's module is imported only when it is used, so importing this package
loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from lqae.errors import ConfigError
from lqae.fewshot.backends.base import DEFAULT_HF_MODEL, Backend, BackendOptions, Request, match_label
from lqae.lazy import lazy_exports

DEFAULT_LLM = "auto"
LLM_FORMS = ("auto", "hf:NAME_OR_PATH", "openai:MODEL", "overlap")
LLM_ENV = "LQAE_LLM"  # the --llm form `auto` stands for, when set

# `--llm` kind -> (module, class) that builds it from the rest of the form
BACKENDS: dict[str, tuple[str, str]] = {
    "hf": ("lqae.fewshot.backends.hf", "HFBackend"),
    "openai": ("lqae.fewshot.backends.openai", "OpenAIBackend"),
    "overlap": ("lqae.fewshot.backends.overlap", "OverlapBackend"),
}

__all__ = [
    "BACKENDS", "DEFAULT_HF_MODEL", "DEFAULT_LLM", "LLM_ENV", "LLM_FORMS", "Backend", "BackendOptions", "HFBackend",
    "OpenAIBackend", "OverlapBackend", "Request", "make_backend", "match_label", "resolve_llm",
]

_, __getattr__ = lazy_exports(__name__, {module: (name,) for module, name in BACKENDS.values()})

if TYPE_CHECKING:
    from lqae.fewshot.backends.hf import HFBackend
    from lqae.fewshot.backends.openai import OpenAIBackend
    from lqae.fewshot.backends.overlap import OverlapBackend


def resolve_llm(spec: str) -> tuple[str, str | None]:
    """(the `--llm` form to use, why) for `spec`; only `auto` is resolved (why is None otherwise):
    `$LQAE_LLM` when set; else `openai:$OPENAI_MODEL` when `OPENAI_BASE_URL` and `OPENAI_MODEL` name a
    server; else `overlap`, the best answer offline (small local LLMs read token text worse than it)."""
    if spec.strip() != "auto":
        return spec, None
    chosen = os.environ.get(LLM_ENV, "").strip()
    if chosen and chosen != "auto":
        return chosen, f"${LLM_ENV}"
    base, model = os.environ.get("OPENAI_BASE_URL", "").strip(), os.environ.get("OPENAI_MODEL", "").strip()
    if base and model:
        return f"openai:{model}", "the server OPENAI_BASE_URL and OPENAI_MODEL name"
    hint = "OPENAI_BASE_URL is set but OPENAI_MODEL is not" if base else "no LLM server configured"
    return "overlap", f"{hint}: set {LLM_ENV}, or OPENAI_BASE_URL and OPENAI_MODEL, or pass --llm"


def make_backend(spec: str, options: BackendOptions | None = None) -> Backend:
    """A backend from its `--llm` form; an unknown form is answered with the known ones."""
    spec, _ = resolve_llm(spec)
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
