"""Builders shared by the few-shot tests (no tests here): a tiny GPT-2 with a byte-level BPE
tokenizer made in-process, synthetic token pools, and a loopback stub of an OpenAI-compatible server."""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lqae.fewshot.episodes import TokenPool

WORDS = ["templar", "pal", "citadel", "baba", "manuel", "monastery", "codex", "pagoda", "operators", "referred"]
LABELS = ["cat", "dog", "hippopotamus", "zebra"]


@contextlib.contextmanager
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine (no OpenMP spinning)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(200):
        text = " ".join(rng.choice(WORDS) for _ in range(6))
        lines.append(f"Answer with one of: cat, dog.\nInput: {text}\nOutput: {rng.choice(LABELS)}\n###")
    return lines


def build_tiny_gpt2(seed: int = 0, chat_template: str | None = None):
    """(model, tokenizer): GPT-2 with 2 layers of width 32 and a 400-token byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=2048, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


def bias_towards(model, tokenizer, label: str, steps: int = 40) -> None:
    """Fine-tune so that `Output:` is followed by `label` whatever the input."""
    rng = random.Random(1)

    def batch() -> list[str]:
        return [
            f"Answer with one of: {', '.join(LABELS)}.\nInput: {' '.join(rng.choice(WORDS) for _ in range(5))}\n"
            f"Output: {label}\n###"
            for _ in range(8)
        ]

    teach_answers(model, tokenizer, batch, steps)


def teach_answers(model, tokenizer, batch, steps: int) -> None:
    """Fine-tune on `steps` batches of `batch()` texts ending `... Output: LABEL\n###`, with the loss on
    the label only; the model is left in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        texts = batch()
        ids = [tokenizer(t)["input_ids"] for t in texts]
        width = max(len(i) for i in ids)
        tensor = torch.full((len(ids), width), tokenizer.eos_token_id)
        labels = torch.full((len(ids), width), -100)
        for row, sequence in enumerate(ids):
            tensor[row, : len(sequence)] = torch.tensor(sequence)
            answer = len(tokenizer(texts[row].rsplit(" ", 1)[0])["input_ids"])  # loss on the label only
            labels[row, answer : len(sequence)] = torch.tensor(sequence[answer:])
        loss = model(input_ids=tensor, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def write_tiny_gpt2(folder: Path, label: str | None = "dog") -> Path:
    """A tiny GPT-2 (biased towards `label` when given) saved as a model folder."""
    model, tokenizer = build_tiny_gpt2()
    if label:
        bias_towards(model, tokenizer, label)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_pool(classes=("a", "b", "c", "d", "e"), per_class: int = 8, length: int = 16, informative: bool = True,
                   seed: int = 0, prefix: str = "img"):
    """A TokenPool whose class c images draw most tokens from a range of their own (or all at random)."""
    rng = random.Random(seed)
    ids, labels, paths = [], [], []
    for c, name in enumerate(classes):
        for i in range(per_class):
            if informative:
                row = [100 + 10 * c + rng.randrange(10) if rng.random() < 0.8 else rng.randrange(1000) for _ in range(length)]
            else:
                row = [rng.randrange(1000) for _ in range(length)]
            ids.append(row)
            labels.append(c)
            paths.append(f"{prefix}/{name}/{i:03d}.png")
    return TokenPool(ids, labels, list(classes), paths, "tiny-lm")


class WordTokenizer:
    """Stand-in LQAE tokenizer: id n decodes to `w<n>`."""

    def decode(self, ids, **kwargs):
        return " ".join(f"w{i}" for i in ids)


# -- OpenAI-compatible stub server ----------------------------------------------------------
_TOKEN = re.compile(r"\s*\S+|\s+")


def fake_logprob(token: str) -> float:
    """Deterministic per-token log-prob: `cat` is likely, everything else less so."""
    return -0.1 if token.strip() == "cat" else -1.0 - 0.01 * len(token)


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # many clients at once (--concurrency)
    daemon_threads = True


class StubServer:
    """An OpenAI-compatible server on 127.0.0.1 with scripted behaviour.

    mode: "ok" | "no-logprobs" (logprobs: null) | "no-echo" (echo ignored) | "zeros" (all log-probs 0) |
    "nan" (NaN log-probs) | "echo-headers" (200 with a text body quoting the request's headers) |
    "trickle" (a 200 whose body comes one byte per 50 ms) | "huge" (a 200 with a body of `huge_bytes`);
    fail_first: HTTP statuses to answer before behaving (e.g. [429]);
    redirect_to: answer every request with a 302 to this base URL.
    """

    def __init__(
        self, mode: str = "ok", fail_first=(), chat_reply: str = "cat", redirect_to: str | None = None,
        huge_bytes: int = 0, latency: float = 0.0, fail_after: int | None = None,
    ) -> None:
        """latency: seconds each answer waits (a remote server); fail_after: answer HTTP 500 once that
        many requests were answered. `most_in_flight` counts the requests served at once."""
        self.mode, self.fail_first, self.chat_reply, self.redirect_to = mode, list(fail_first), chat_reply, redirect_to
        self.huge_bytes, self.trickled, self.stop = huge_bytes, 0, False
        self.latency, self.fail_after = latency, fail_after
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                with stub.lock:
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                self.counted = True
                try:
                    self._answer()
                finally:
                    self._answered()

            def _answered(self):
                """A request stops counting as in flight once its reply starts (the client may send
                the next one before this handler's thread has finished)."""
                if getattr(self, "counted", False):
                    self.counted = False
                    with stub.lock:
                        stub.in_flight -= 1

            def _answer(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, **body})
                    stub.headers.append(dict(self.headers))
                    failing = stub.fail_after is not None and len(stub.requests) > stub.fail_after
                if stub.latency:
                    time.sleep(stub.latency)
                if failing:
                    self._send(500, {"error": {"message": "scripted outage"}})
                    return
                if stub.redirect_to:
                    self._send(302, {}, {"Location": stub.redirect_to + self.path.removeprefix("/v1")})
                    return
                if stub.mode in ("echo-headers", "trickle", "huge"):
                    self._raw_reply()
                    return
                with stub.lock:
                    status = stub.fail_first.pop(0) if stub.fail_first else None
                if status is not None:
                    self._send(status, {"error": {"message": f"scripted {status}"}}, {"Retry-After": "0"})
                    return
                if self.path.endswith("/chat/completions"):
                    self._send(200, {"choices": [{"message": {"role": "assistant", "content": stub.chat_reply}}]})
                elif self.path.endswith("/completions"):
                    self._send(200, stub.completion(body))
                else:
                    self._send(404, {"error": {"message": "no such endpoint"}})

            def _raw_reply(self):
                if stub.mode == "echo-headers":  # the key starts near character 100 of the body
                    data = ("<p>" + "." * 77 + " Authorization: " + self.headers.get("Authorization", "") + "; Host: "
                            + self.headers.get("Host", "") + "</p>").encode()
                elif stub.mode == "huge":
                    data = b"x" * stub.huge_bytes
                else:
                    data = json.dumps({"choices": []}).encode() + b" " * 200
                self._answered()
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if stub.mode == "echo-headers" else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if stub.mode != "trickle":
                    self.wfile.write(data)
                    return
                try:
                    for byte in data:
                        if stub.stop:
                            break
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        stub.trickled += 1
                        time.sleep(0.05)
                except OSError:  # the client hung up
                    pass

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self._answered()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def completion(self, body: dict) -> dict:
        prompt = body["prompt"]
        tokens = _TOKEN.findall(prompt) + [" and"]  # echoed prompt + one generated token
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        values = [None] + [fake_logprob(t) for t in tokens[1:]]
        if self.mode == "no-logprobs":
            logprobs = None
        elif self.mode == "no-echo":
            logprobs = {"tokens": [" and"], "token_logprobs": [-0.5], "text_offset": [len(prompt)]}
        elif self.mode == "nan":
            logprobs = {"tokens": tokens, "token_logprobs": [None] + [float("nan")] * (len(tokens) - 1),
                        "text_offset": offsets}
        elif self.mode == "zeros":
            logprobs = {"tokens": tokens, "token_logprobs": [None] + [0.0] * (len(tokens) - 1), "text_offset": offsets}
        else:
            logprobs = {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}
        return {"choices": [{"text": prompt + " and", "logprobs": logprobs}]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
