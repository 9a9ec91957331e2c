"""OpenAI-compatible HTTP servers (vLLM, llama.cpp, Ollama, OpenAI) as few-shot backends.

Standard library only (urllib). Log-likelihood: /v1/completions with echo=true and logprobs, the
label's log-probs read from the echoed prompt tokens (by character offset). Generation:
/v1/chat/completions, temperature 0. The API key comes from OPENAI_API_KEY and never appears in
messages or logs. Servers that ignore `echo` or return no prompt log-probs are detected and fail
with LLMError instead of producing chance-level numbers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request

from lqae.errors import LLMError
from lqae.fewshot.backends.base import Backend, BackendOptions, Request
from lqae.fewshot.budget import load_tiktoken
from lqae.fewshot.prompts import Prompt

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.openai.com/v1"
DEFAULT_CONTEXT = 4096
_HINTS = {
    401: "; check OPENAI_API_KEY",
    403: "; check OPENAI_API_KEY and the model's access",
    404: "; check --api-base (it should end in /v1) and the model name",
}
NO_LOGPROBS = (
    "does not return log-probabilities of prompt tokens (echo + logprobs on /v1/completions), so labels "
    "cannot be scored by log-likelihood; use --scoring generate, or a server that supports them (e.g. vLLM)"
)


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible API; tokens are counted with a tiktoken encoding."""

    supports_chat_loglik = False  # /v1/completions takes text; the server's chat template is out of reach
    concurrent_requests = True  # each request is its own HTTP call; the server takes several at once

    def __init__(
        self,
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        encoding=None,
        context_tokens: int = DEFAULT_CONTEXT,
    ) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.api_base = (api_base or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE).rstrip("/")
        self._key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.encoding = encoding if encoding is not None else load_tiktoken(model)
        self.context_tokens = context_tokens

    @classmethod
    def from_llm(cls, target: str, options: BackendOptions) -> "OpenAIBackend | None":
        """`--llm openai:MODEL`; tokens counted with the model's tiktoken encoding (or `bpe_file`)."""
        if not target:
            return None
        return cls(
            target, api_base=options.api_base, timeout=options.timeout, retries=options.retries,
            encoding=load_tiktoken(target, options.bpe_file),
        )

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, api_base={self.api_base!r})"

    def supports_chat(self) -> bool:
        return True  # messages go to /v1/chat/completions as they are

    # -- counting ---------------------------------------------------------------------------
    def count_text(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))

    def count(self, prompt: Prompt) -> int:
        if prompt.messages is not None:  # OpenAI's rule of thumb: 3 tokens per message, 3 to prime the reply
            return sum(self.count_text(m["content"]) + 3 for m in prompt.messages) + 3
        return self.count_text(prompt.text)

    # -- scoring ----------------------------------------------------------------------------
    def loglik(self, request: Request) -> list[list[tuple[float, int]]]:
        results = []
        for prompt in request.prompts:
            row = []
            for label in request.labels:
                context = prompt.text
                full = context + prompt.delimiter + label
                payload = {
                    "model": self.model, "prompt": full, "max_tokens": 1, "temperature": 0, "echo": True,
                    "logprobs": 1,
                }
                row.append(continuation_logprob(self._post("/completions", payload), full, len(context), self.api_base))
            results.append(row)
        return results

    def generate(self, request: Request, max_new_tokens: int) -> list[str]:
        replies = []
        for prompt in request.prompts:
            messages = list(prompt.messages) if prompt.messages else [{"role": "user", "content": prompt.text}]
            payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
            response = self._post("/chat/completions", payload)
            try:
                content = response["choices"][0]["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise LLMError(f"{self.api_base}/chat/completions answered without choices[0].message") from exc
            replies.append(content.split("\n")[0])
        return replies

    # -- HTTP -------------------------------------------------------------------------------
    def _post(self, path: str, payload: dict) -> dict:
        """POST JSON; retries with exponential back-off on 429, 5xx, timeouts and refused connections."""
        url = self.api_base + path
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "lqae-fewshot"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            last_try = attempt == self.retries
            log.debug("POST %s (try %d)", url, attempt + 1)
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with _NO_REDIRECTS.open(request, timeout=self.timeout) as response:
                    body = response.read()
            except _Redirected as exc:
                raise LLMError(
                    f"{url} answered a redirect (HTTP {exc.code}) to {self._redact(exc.location)}; requests carrying "
                    "the API key do not follow redirects: set --api-base to the final address"
                ) from None
            except urllib.error.HTTPError as exc:
                detail = self._redact(_server_message(exc))
                if (exc.code == 429 or exc.code >= 500) and not last_try:
                    wait = _retry_after(exc.headers, delay)
                    log.info("HTTP %d from %s; retrying in %.1fs", exc.code, url, wait)
                    time.sleep(wait)
                    delay *= 2
                    continue
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise LLMError(f"{url} answered HTTP {exc.code}{tries}: {detail}{_HINTS.get(exc.code, '')}") from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if not last_try:
                    log.info("cannot reach %s (%s); retrying in %.1fs", url, reason, delay)
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise LLMError(
                    f"cannot reach the OpenAI-compatible server at {self.api_base} ({self._redact(str(reason))}) "
                    f"after {attempt + 1} tries; is it running? check --api-base"
                ) from None
            try:
                return json.loads(body)
            except ValueError:
                raise LLMError(f"{url} answered with something that is not JSON: {body[:120]!r}") from None
        raise AssertionError("unreachable")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


class _Redirected(Exception):
    def __init__(self, code: int, location: str) -> None:
        super().__init__(f"HTTP {code} to {location}")
        self.code, self.location = code, location


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib keeps the Authorization header across a redirect, even to another host (and turns the
    POST into a GET): never follow one with the key; say where the server pointed instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(code, newurl)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def continuation_logprob(response: dict, full: str, start: int, where: str = "the server") -> tuple[float, int]:
    """(sum of log-probs, token count) of the echoed tokens covering full[start:]; LLMError when the
    response carries no usable prompt log-probs."""
    try:
        logprobs = response["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise LLMError(f"{where} answered /v1/completions without choices") from None
    values = (logprobs or {}).get("token_logprobs")
    tokens = (logprobs or {}).get("tokens")
    offsets = (logprobs or {}).get("text_offset")
    if not values:
        raise LLMError(f"{where} {NO_LOGPROBS}")
    if offsets is None and tokens is not None:  # rebuild offsets from the token strings
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
    if offsets is None or len(offsets) != len(values) or (tokens is not None and len(tokens) != len(values)):
        raise LLMError(f"{where} {NO_LOGPROBS} (no usable tokens/text_offset)")
    if not offsets or offsets[0] != 0:  # echo ignored: only the generated token came back
        raise LLMError(f"{where} {NO_LOGPROBS} (echo was ignored)")
    ends = [offsets[i + 1] if i + 1 < len(offsets) else offsets[i] + len(tokens[i] if tokens else "x")
            for i in range(len(offsets))]
    picked = [i for i in range(len(offsets)) if offsets[i] < len(full) and ends[i] > start]
    prompt_values = [values[i] for i in range(1, len(values)) if offsets[i] < len(full)]
    if not picked or any(values[i] is None for i in picked):
        raise LLMError(f"{where} {NO_LOGPROBS} (the label's tokens have no log-probs)")
    if prompt_values and all(v == 0 for v in prompt_values):
        raise LLMError(f"{where} {NO_LOGPROBS} (every prompt token came back with log-prob 0)")
    return float(sum(values[i] for i in picked)), len(picked)


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        parsed = json.loads(body)
        message = parsed.get("error", parsed)
        if isinstance(message, dict):
            message = message.get("message", message)
        body = str(message)
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:200] or str(error.reason)


def _retry_after(headers, default: float) -> float:
    try:
        return min(max(float(headers.get("Retry-After")), 0.0), 60.0)
    except (TypeError, ValueError):
        return default
