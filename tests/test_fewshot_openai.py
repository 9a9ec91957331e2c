"""OpenAI-compatible backend against a loopback stub server (127.0.0.1 only)."""

from __future__ import annotations

import logging
import socket

import pytest

from lqae.errors import LLMError
from lqae.fewshot.backends import Request
from lqae.fewshot.backends.openai import OpenAIBackend, continuation_logprob
from lqae.fewshot.prompts import load_template, render
from test_fewshot_helpers import StubServer, fake_logprob

SECRET = "sk-test-secret-123"
LABELS = ["cat", "dog", "hippopotamus zebra"]


def byte_encoding():
    import tiktoken

    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={})


def backend_for(url, **kwargs):
    options = dict(api_key=SECRET, timeout=5, retries=2, backoff=0.01, encoding=byte_encoding())
    options.update(kwargs)
    return OpenAIBackend("stub-model", api_base=url, **options)


def request(template="completion"):
    prompts = render(load_template(template), LABELS, [("templar pal", "cat"), ("citadel baba", "dog")], ["codex pal"])
    return Request(prompts, LABELS)


def test_loglik_reads_the_echoed_label_tokens():
    with StubServer() as server:
        backend = backend_for(server.url)
        rows = backend.loglik(request())
    assert len(rows) == 1
    scores = {label: value for label, (value, _) in zip(LABELS, rows[0])}
    assert scores["cat"] == pytest.approx(fake_logprob(" cat"))
    assert scores["hippopotamus zebra"] == pytest.approx(fake_logprob(" hippopotamus") + fake_logprob(" zebra"))
    assert rows[0][2][1] == 2  # two tokens
    assert max(scores, key=scores.get) == "cat"
    sent = server.requests[0]
    assert sent["path"] == "/v1/completions" and sent["echo"] is True and sent["logprobs"] == 1
    assert sent["prompt"].endswith("Input: codex pal\nOutput: cat") and sent["model"] == "stub-model"
    assert server.headers[0]["Authorization"] == f"Bearer {SECRET}"


def test_generation_goes_through_chat_completions():
    with StubServer(chat_reply="dog\nmore text") as server:
        replies = backend_for(server.url).generate(request("chat"), 5)
    assert replies == ["dog"]
    sent = server.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["max_tokens"] == 5 and sent["temperature"] == 0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["content"].endswith("Input: codex pal\nOutput:")


def test_429_then_success_is_retried():
    with StubServer(fail_first=[429, 503]) as server:
        rows = backend_for(server.url).loglik(Request(request().prompts, ["cat"]))
    assert rows[0][0][0] == pytest.approx(fake_logprob(" cat"))
    assert len(server.requests) == 3


def test_persistent_server_errors_give_up_with_the_status():
    with StubServer(fail_first=[500] * 10) as server:
        with pytest.raises(LLMError, match="HTTP 500 after 3 tries"):
            backend_for(server.url).loglik(Request(request().prompts, ["cat"]))


@pytest.mark.parametrize("mode", ["no-logprobs", "no-echo", "zeros"])
def test_a_server_without_prompt_logprobs_fails_clearly(mode):
    with StubServer(mode=mode) as server:
        with pytest.raises(LLMError, match="does not return log-probabilities of prompt tokens.*--scoring generate"):
            backend_for(server.url).loglik(request())


def test_unreachable_server_is_a_clear_error_without_the_key(caplog):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.DEBUG, logger="lqae")
    with pytest.raises(LLMError) as info:
        backend_for(f"http://127.0.0.1:{port}/v1").loglik(request())
    message = str(info.value)
    assert "cannot reach the OpenAI-compatible server" in message and "after 3 tries" in message
    assert SECRET not in message and SECRET not in caplog.text


@pytest.mark.parametrize("template", ["completion", "chat"])
def test_a_redirect_to_another_host_never_receives_the_key(template):
    with StubServer() as elsewhere, StubServer(redirect_to=elsewhere.url.replace("127.0.0.1", "localhost")) as server:
        backend = backend_for(server.url)
        with pytest.raises(LLMError, match="redirect.*--api-base") as info:
            if template == "completion":
                backend.loglik(request())
            else:
                backend.generate(request("chat"), 4)
    assert len(server.requests) == 1 and server.headers[0]["Authorization"] == f"Bearer {SECRET}"
    assert elsewhere.requests == []  # the key never left for the other host
    assert "localhost" in str(info.value) and SECRET not in str(info.value)


def test_client_errors_are_not_retried_and_hide_the_key():
    with StubServer(fail_first=[401]) as server:
        with pytest.raises(LLMError, match="HTTP 401.*OPENAI_API_KEY") as info:
            backend_for(server.url).loglik(request())
    assert len(server.requests) == 1 and SECRET not in str(info.value)
    assert SECRET not in repr(backend_for(server.url))


def test_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with StubServer() as server:
        OpenAIBackend("m", api_base=server.url, encoding=byte_encoding(), backoff=0.01).loglik(Request(request().prompts, ["cat"]))
    assert server.headers[0]["Authorization"] == "Bearer sk-from-env"


def test_counting_uses_tiktoken():
    backend = backend_for("http://127.0.0.1:9/v1")
    prompt = request().prompts[0]
    assert backend.count(prompt) == len(prompt.text.encode())
    chat = request("chat").prompts[0]
    assert backend.count(chat) == sum(len(m["content"].encode()) + 3 for m in chat.messages) + 3
    assert backend.context_tokens == 4096


def test_offsets_rebuilt_from_tokens_when_missing():
    full = "Output: cat"
    response = {"choices": [{"logprobs": {"tokens": ["Output", ":", " cat", " x"], "token_logprobs": [None, -1.0, -0.5, -2.0]}}]}
    assert continuation_logprob(response, full, len("Output:")) == (-0.5, 1)
