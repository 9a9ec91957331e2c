"""Few-shot image classification with a text-only LLM reading LQAE token text (Frozen protocol).

Modules: `episodes` (token pools, episode sampling), `prompts` (templates), `budget` (context-window
fitting, tiktoken), `backends` / `hf` / `openai_compat` (LLMs and the overlap baseline), `evaluate`
(prediction, evaluation, resumable results), `run` (the `lqae fewshot` entry point).
torch and transformers load only with the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "FewshotJob": "lqae.fewshot.run",
    "Progress": "lqae.fewshot.run",
    "run_fewshot": "lqae.fewshot.run",
    "FewshotSettings": "lqae.fewshot.evaluate",
    "EvalSummary": "lqae.fewshot.evaluate",
    "Prediction": "lqae.fewshot.evaluate",
    "PredictionRun": "lqae.fewshot.evaluate",
    "SupportSet": "lqae.fewshot.evaluate",
    "evaluate": "lqae.fewshot.evaluate",
    "predict": "lqae.fewshot.evaluate",
    "wilson_interval": "lqae.fewshot.evaluate",
    "TokenPool": "lqae.fewshot.episodes",
    "TokenTextDecoder": "lqae.fewshot.episodes",
    "sample_episode": "lqae.fewshot.episodes",
    "Template": "lqae.fewshot.prompts",
    "Prompt": "lqae.fewshot.prompts",
    "list_templates": "lqae.fewshot.prompts",
    "load_template": "lqae.fewshot.prompts",
    "render": "lqae.fewshot.prompts",
    "BudgetError": "lqae.fewshot.budget",
    "fit_prompt": "lqae.fewshot.budget",
    "load_tiktoken": "lqae.fewshot.budget",
    "Backend": "lqae.fewshot.backends",
    "OverlapBackend": "lqae.fewshot.backends",
    "make_backend": "lqae.fewshot.backends",
    "DEFAULT_LLM": "lqae.fewshot.backends",
    "HFBackend": "lqae.fewshot.hf",
    "OpenAIBackend": "lqae.fewshot.openai_compat",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from lqae.fewshot.backends import DEFAULT_LLM, Backend, OverlapBackend, make_backend
    from lqae.fewshot.budget import BudgetError, fit_prompt, load_tiktoken
    from lqae.fewshot.episodes import TokenPool, TokenTextDecoder, sample_episode
    from lqae.fewshot.evaluate import (
        EvalSummary, FewshotSettings, Prediction, PredictionRun, SupportSet, evaluate, predict, wilson_interval,
    )
    from lqae.fewshot.hf import HFBackend
    from lqae.fewshot.openai_compat import OpenAIBackend
    from lqae.fewshot.prompts import Prompt, Template, list_templates, load_template, render
    from lqae.fewshot.run import FewshotJob, Progress, run_fewshot


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lqae.fewshot' has no attribute {name!r}")
