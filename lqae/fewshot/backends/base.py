"""The interface every few-shot backend implements: score candidate labels, or generate.

Implementations import this module only, never the package's registry (`lqae.fewshot.backends`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lqae.errors import ConfigError
from lqae.fewshot.prompts import ChatFormatter, Prompt
from lqae.layout import NO_LAYOUT, TokenLayout

DEFAULT_HF_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the default local LLM (bundled offline as a GGUF)


@dataclass
class Request:
    """One support set and its queries, as text prompts and as token ids (for backends without an LLM)."""

    prompts: list[Prompt]  # one per query, all sharing one prefix; empty for backends that read ids
    labels: list[str]  # candidate labels as the LLM sees them
    support_ids: list[list[int]] = field(default_factory=list)  # LQAE token ids of each support
    support_labels: list[int] = field(default_factory=list)  # index into labels, per support
    query_ids: list[list[int]] = field(default_factory=list)  # LQAE token ids of each query
    layout: TokenLayout = NO_LAYOUT  # the supports' and queries' token layout: global words first
    global_weight: float = 1.0  # how much a shared global word counts in a token overlap


@dataclass(frozen=True)
class BackendOptions:
    """What `make_backend` may hand a backend besides its `--llm` target; each kind reads its own."""

    device: str = "cpu"  # local models: where they run
    api_base: str | None = None  # openai: base URL ending in /v1 (None: $OPENAI_BASE_URL or api.openai.com)
    timeout: float = 60.0  # openai: seconds per HTTP request
    retries: int = 4  # openai: retries with back-off on 429/5xx/unreachable
    bpe_file: str | Path | None = None  # openai: tiktoken file for counting tokens offline
    reuse_prefix: bool = True  # local models: reuse the shared prompt prefix's key/values


class Backend:
    """Interface. `loglik` returns, per query and label, (summed log-probability of the label's
    tokens after the prompt, number of those tokens); `generate` returns each query's greedy reply."""

    name = "backend"
    reads_text = True  # False: reads token ids, needs no prompt (and no context budget)
    context_tokens: int | None = None  # default context window; None = unlimited
    chat_format: ChatFormatter | None = None  # renders chat messages to prompt text (local models)
    supports_chat_loglik = True  # chat templates can be scored by log-likelihood
    supports_constrained = False  # `constrained` is implemented
    concurrent_requests = False  # loglik/generate may be called from several threads at once (--concurrency)

    @classmethod
    def from_llm(cls, target: str, options: BackendOptions) -> "Backend | None":
        """The backend `--llm KIND:TARGET` names (TARGET may be empty); None when this kind takes no
        such target, which `make_backend` answers with the known forms."""
        raise NotImplementedError

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

    def constrained(self, request: Request) -> list[int]:
        """Greedy decoding restricted to the labels' tokens: per query, the index of the label produced."""
        raise ConfigError(f"{self.name} cannot restrict generation to the labels; use --scoring loglik or generate")


def match_label(output: str, labels: Sequence[str]) -> int | None:
    """Index of the label a generated reply starts with (the longest if several), else None."""
    reply = output.strip().lstrip("\"'`*([{").casefold()
    matches = [j for j, label in enumerate(labels) if reply.startswith(label.casefold())]
    return max(matches, key=lambda j: len(labels[j])) if matches else None
