"""LLM backends behind one interface: score candidate labels, or generate.

`--llm` forms: `hf:NAME_OR_PATH` (local transformers causal LM, GGUF included), `openai:MODEL`
(any OpenAI-compatible server), `overlap` (no LLM: token-overlap nearest neighbour).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lqae.errors import ConfigError
from lqae.fewshot.episodes import shared_tokens
from lqae.fewshot.prompts import ChatFormatter, Prompt

DEFAULT_HF_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LLM = f"hf:{DEFAULT_HF_MODEL}"
LLM_FORMS = ("hf:NAME_OR_PATH", "openai:MODEL", "overlap")


@dataclass
class Request:
    """One support set and its queries, as text prompts and as token ids (for backends without an LLM)."""

    prompts: list[Prompt]  # one per query, all sharing one prefix; empty for backends that read ids
    labels: list[str]  # candidate labels as the LLM sees them
    support_ids: list[list[int]] = field(default_factory=list)  # LQAE token ids of each support
    support_labels: list[int] = field(default_factory=list)  # index into labels, per support
    query_ids: list[list[int]] = field(default_factory=list)  # LQAE token ids of each query


class Backend:
    """Interface. `loglik` returns, per query and label, (summed log-probability of the label's
    tokens after the prompt, number of those tokens); `generate` returns each query's greedy reply."""

    name = "backend"
    reads_text = True  # False: reads token ids, needs no prompt (and no context budget)
    context_tokens: int | None = None  # default context window; None = unlimited
    chat_format: ChatFormatter | None = None  # renders chat messages to prompt text (local models)
    supports_chat_loglik = True  # chat templates can be scored by log-likelihood

    def supports_chat(self) -> bool:
        """Whether chat templates can be used (a local model needs its own chat template)."""
        return self.chat_format is not None

    def count(self, prompt: Prompt) -> int:
        """LLM tokens of the prompt as this backend sends it."""
        raise NotImplementedError

    def count_text(self, text: str) -> int:
        """LLM tokens of a piece of text, e.g. a label continuation."""
        raise NotImplementedError

    def loglik(self, request: Request) -> list[list[tuple[float, int]]]:
        raise NotImplementedError

    def generate(self, request: Request, max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    supports_constrained = False  # `constrained` is implemented

    def constrained(self, request: Request) -> list[int]:
        """Greedy decoding restricted to the labels' tokens: per query, the index of the label produced."""
        raise ConfigError(f"{self.name} cannot restrict generation to the labels; use --scoring loglik or generate")


class OverlapBackend(Backend):
    """No LLM: each label scores the largest token overlap (multiset intersection, as a fraction of
    the query's tokens) between the query and one of that label's supports; ties go to the larger
    mean overlap. The honest baseline: how much class information the tokens carry on their own."""

    name = "overlap"
    reads_text = False

    def loglik(self, request: Request) -> list[list[tuple[float, int]]]:
        supports = [Counter(ids) for ids in request.support_ids]
        results = []
        for query in request.query_ids:
            bag, size = Counter(query), max(len(query), 1)
            overlaps: list[list[float]] = [[] for _ in request.labels]
            for support, label in zip(supports, request.support_labels):
                overlaps[label].append(shared_tokens(bag, support) / size)
            results.append([
                (max(values) + 1e-3 * sum(values) / len(values), 0) if values else (float("-inf"), 0)
                for values in overlaps
            ])
        return results

    supports_constrained = True

    def generate(self, request: Request, max_new_tokens: int) -> list[str]:
        return [request.labels[j] for j in self.constrained(request)]

    def constrained(self, request: Request) -> list[int]:
        return [max(range(len(row)), key=lambda j: row[j][0]) for row in self.loglik(request)]


def make_backend(
    spec: str,
    *,
    device: str = "cpu",
    api_base: str | None = None,
    timeout: float = 60.0,
    retries: int = 4,
    bpe_file: str | Path | None = None,
    reuse_prefix: bool = True,
) -> Backend:
    """A backend from its `--llm` form; an unknown form is answered with the known ones."""
    spec = spec.strip()
    if spec == "overlap":
        return OverlapBackend()
    kind, _, target = spec.partition(":")
    if kind == "hf":
        from lqae.fewshot.hf import HFBackend

        return HFBackend.load(target or DEFAULT_HF_MODEL, device=device, reuse_prefix=reuse_prefix)
    if kind == "openai" and target:
        from lqae.fewshot.budget import load_tiktoken
        from lqae.fewshot.openai_compat import OpenAIBackend

        return OpenAIBackend(
            target, api_base=api_base, timeout=timeout, retries=retries, encoding=load_tiktoken(target, bpe_file)
        )
    raise ConfigError(f"unknown --llm {spec!r}; use one of: {', '.join(LLM_FORMS)} (default {DEFAULT_LLM})")


def match_label(output: str, labels: Sequence[str]) -> int | None:
    """Index of the label a generated reply starts with (the longest if several), else None."""
    reply = output.strip().lstrip("\"'`*([{").casefold()
    matches = [j for j, label in enumerate(labels) if reply.startswith(label.casefold())]
    return max(matches, key=lambda j: len(labels[j])) if matches else None
