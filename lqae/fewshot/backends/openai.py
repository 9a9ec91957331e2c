"""OpenAI-compatible HTTP servers (vLLM, llama.cpp, Ollama, OpenAI) as few-shot backends.

Standard library only (http.client; see `post_once`, and the README on why not httpx). Log-likelihood: /v1/completions with echo=true and logprobs, the
label's log-probs read from the echoed prompt tokens (by character offset). Generation:
/v1/chat/completions, temperature 0. The API key comes from OPENAI_API_KEY and never appears in
messages or logs. Servers that ignore `echo` or return no prompt log-probs are detected and fail
with LLMError instead of producing chance-level numbers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request

from lqae.errors import ConfigError, LLMError
from lqae.fewshot.backends.base import Backend, BackendOptions, Request
from lqae.fewshot.prompts import Prompt
from lqae.llm_files import load_tiktoken

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
        check_model_name(model)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout!r}")
        self.model = model
        self.name = f"openai:{model}"
        self.api_base = (api_base or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE).rstrip("/")
        self.shown_base = public_url(self.api_base)  # what errors and logs print: no user:password
        self._key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.encoding = encoding if encoding is not None else load_tiktoken(model)
        self.context_tokens = context_tokens

    @classmethod
    def from_llm(cls, target: str, options: BackendOptions) -> "OpenAIBackend | None":
        """`--llm openai:MODEL`; tokens counted with the model's tiktoken encoding (or `bpe_file`)."""
        if not target:
            return None
        check_model_name(target)  # before anything else: a URL here would send the key to the default server
        return cls(
            target, api_base=options.api_base, timeout=options.timeout, retries=options.retries,
            encoding=load_tiktoken(target, options.bpe_file),
        )

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, api_base={self.shown_base!r})"

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
                row.append(continuation_logprob(self._post("/completions", payload), full, len(context), self.shown_base))
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
                raise LLMError(f"{self.shown_base}/chat/completions answered without choices[0].message") from exc
            if not isinstance(content, str):
                raise LLMError(
                    f"{self.shown_base}/chat/completions answered a message whose content is not text "
                    f"({type(content).__name__} {self._excerpt(json.dumps(content), 60)})"
                )
            replies.append(content.split("\n")[0])
        return replies

    # -- HTTP -------------------------------------------------------------------------------
    def _post(self, path: str, payload: dict) -> dict:
        """POST JSON; retries with exponential back-off on 429, 5xx, timeouts and refused connections.
        Each try is one `post_once`: its own connection, deadline and size cap (safe from threads)."""
        url, shown = self.api_base + path, self.shown_base + path
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "lqae-fewshot"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            last_try = attempt == self.retries
            tries = f" after {attempt + 1} tries" if attempt else ""
            log.debug("POST %s (try %d)", url, attempt + 1)
            try:
                status, reply_headers, body = post_once(url, data, headers, self.timeout)
            except ReplyTooLarge as exc:
                raise LLMError(
                    f"{shown} answered more than {exc.limit:,} bytes; refusing to read it (is --api-base right?)"
                ) from None
            except (RequestTimeout, OSError, http.client.HTTPException) as exc:
                reason = f"no answer within --timeout {self.timeout:g} s" if isinstance(exc, RequestTimeout) else exc
                if not last_try:
                    log.info("cannot reach %s (%s); retrying in %.1fs", shown, self._excerpt(str(reason)), delay)
                    time.sleep(delay)
                    delay = min(2 * delay, MAX_BACKOFF)
                    continue
                raise LLMError(
                    f"cannot reach the OpenAI-compatible server at {self.shown_base} ({self._excerpt(str(reason))}) "
                    f"after {attempt + 1} tries; is it running? check --api-base"
                ) from None
            if 300 <= status < 400:
                raise LLMError(
                    f"{shown} answered a redirect (HTTP {status}) to "
                    f"{public_url(self._excerpt(reply_headers.get('Location', '?')))}; "
                    "requests carrying the API key do not follow redirects: set --api-base to the final address"
                )
            if status >= 400:
                if (status == 429 or status >= 500) and not last_try:
                    wait = _retry_after(reply_headers, delay)
                    log.info("HTTP %d from %s; retrying in %.1fs", status, shown, wait)
                    time.sleep(wait)
                    delay = min(2 * delay, MAX_BACKOFF)
                    continue
                detail = self._excerpt(_server_message(body)) or f"HTTP {status}"
                raise LLMError(f"{shown} answered HTTP {status}{tries}: {detail}{_HINTS.get(status, '')}")
            try:
                return json.loads(body)
            except ValueError:
                raise LLMError(f"{shown} answered with something that is not JSON: {self._excerpt(body)!r}") from None
        raise AssertionError("unreachable")

    def _excerpt(self, text: str | bytes, limit: int = 200) -> str:
        """A server's words fit for an error line: on one line, the API key and any bearer token
        blanked out first, then cut to `limit` characters (a cut never leaves part of a key)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if self._key:  # in any letter case, and split by white space (a line break) anywhere inside
            text = re.sub(r"\s*".join(map(re.escape, self._key)), "***", text, flags=re.IGNORECASE)
        text = " ".join(text.split())
        text = _SECRETS.sub(r"\1***", text)
        return public_url(text)[:limit]


# `Bearer TOKEN`, `api_key: "TOKEN"` and the like, whatever the token (a proxy's, another key)
_SECRETS = re.compile(r"(?i)(bearer\s+|api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+")
MAX_REPLY_BYTES = 64 << 20  # an echoed 128k-token prompt with its log-probs is about 20 MB
MAX_BACKOFF = 60.0  # seconds: the back-off doubles up to this (and a server's Retry-After is capped alike)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def check_model_name(model: str) -> None:
    """ConfigError for a server address given where the model name goes (`openai:http://host/v1`):
    the request, with the key, would go to the default endpoint."""
    if "://" in model or model.startswith(("http:", "https:", "localhost", "127.0.0.1")):
        raise ConfigError(
            f"openai:{model} names a server where the model name goes: write --llm openai:MODEL and give the "
            "server with --api-base http://host:port/v1"
        )


def public_url(text: str) -> str:
    """`text` with the user:password of any URL in it blanked (`http://***@host/v1`)."""
    return _USERINFO.sub(r"\1***@", text)


class RequestTimeout(Exception):
    """The whole request took longer than its timeout."""


class ReplyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"reply over {limit} bytes")
        self.limit = limit


def post_once(
    url: str, body: bytes, headers: dict[str, str], timeout: float, limit: int | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP POST: (status, reply headers, reply body).

    `timeout` bounds the whole exchange (connect, send, the wait for the answer, reading it): at
    the deadline a watchdog shuts the socket down and RequestTimeout is raised, so a server that
    trickles bytes cannot hold a request longer. A reply over `limit` bytes (MAX_REPLY_BYTES by
    default) raises ReplyTooLarge, from its Content-Length or while it is read. A redirect is
    returned as it is, never followed. HTTP(S)_PROXY and NO_PROXY apply (no proxy authentication).
    Everything lives in the call: safe to run from several threads at once."""
    limit = MAX_REPLY_BYTES if limit is None else limit
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(f"{url} is not an http:// or https:// address; check --api-base")
    proxy = _proxy_for(parts)
    connection = _connection(parts, proxy, timeout)
    expired = threading.Event()
    opened: list[socket.socket] = []  # http.client lets go of its socket once a reply says "close"

    def cut() -> None:
        expired.set()
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked send or recv at once

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()  # bounded by the socket timeout; the watchdog covers what follows
        opened.append(connection.sock)
        if expired.is_set():
            raise RequestTimeout()
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("POST", url if proxy and parts.scheme == "http" else path, body=body, headers=headers)
        response = connection.getresponse()
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ReplyTooLarge(limit)
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ReplyTooLarge(limit)
            chunks.append(chunk)
        if expired.is_set():
            raise RequestTimeout()
        return response.status, response.headers, b"".join(chunks)
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise RequestTimeout() from None
        raise
    finally:
        watchdog.cancel()
        connection.close()
        for sock in opened:
            sock.close()


def _connection(parts, proxy, timeout: float) -> http.client.HTTPConnection:
    """A connection to the server of `parts` (a split URL), through `proxy` when one applies."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host, host_port = (proxy.hostname, proxy.port or 80) if proxy else (parts.hostname, port)
    if parts.scheme == "http":
        return http.client.HTTPConnection(host, host_port, timeout=timeout)
    connection = http.client.HTTPSConnection(host, host_port, timeout=timeout, context=ssl.create_default_context())
    if proxy:
        connection.set_tunnel(parts.hostname, port)
    return connection


def _proxy_for(parts) -> urllib.parse.SplitResult | None:
    """The proxy that HTTP(S)_PROXY names for this URL, unless NO_PROXY exempts its host."""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")


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
    strange = [values[i] for i in picked if not _is_number(values[i]) or values[i] > 1e-4]
    total = float(sum(values[i] for i in picked)) if not strange else 0.0
    if strange or not math.isfinite(total):
        example = strange[0] if strange else f"a sum of {total}"
        raise LLMError(
            f"{where} answered log-probabilities that are not finite numbers of at most 0 for the label's tokens "
            f"(e.g. {example!r}); the server is misbehaving: check it before trusting any score"
        )
    if prompt_values and all(v == 0 for v in prompt_values):
        raise LLMError(f"{where} {NO_LOGPROBS} (every prompt token came back with log-prob 0)")
    return total, len(picked)


def _server_message(body: bytes) -> str:
    """The error message in a server's reply (OpenAI's {"error": {"message": ...}}), else its text."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        message = parsed.get("error", parsed)
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)
    except (ValueError, AttributeError):
        return text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _retry_after(headers, default: float) -> float:
    """The server's Retry-After in seconds, between 0 and MAX_BACKOFF; `default` when absent or not
    a finite number (`nan`, a date)."""
    try:
        wait = float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return default
    return min(max(wait, 0.0), MAX_BACKOFF) if math.isfinite(wait) else default
