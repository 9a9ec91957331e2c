"""The few-shot protocol options: contextual calibration, support ordering, label words, constrained
generation, and the diagnostics that show a biased LLM."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lqae.errors import ConfigError
from lqae.fewshot.backends import OverlapBackend, Request
from lqae.fewshot.backends.hf import HFBackend
from lqae.fewshot.episodes import TokenPool
from lqae.fewshot.image_text import PromptImageText, frequent_first
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.prompts import load_template, render
from lqae.fewshot.results import ResultsFile
from lqae.fewshot.settings import FewshotSettings
from lqae.fewshot.support import SupportSet
from test_fewshot_helpers import WordTokenizer, bias_towards, build_tiny_gpt2, synthetic_pool, teach_answers


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny GPT-2s run faster on one thread


@pytest.fixture(scope="module")
def dog_gpt2():
    model, tokenizer = build_tiny_gpt2(seed=1)
    bias_towards(model, tokenizer, "dog")
    return HFBackend(model, tokenizer)


def pools(classes=("cat", "dog")):
    return synthetic_pool(classes=classes), synthetic_pool(classes=classes, prefix="val", seed=1)


def run(backend, episodes=24, tmp_path=None, **settings):
    support, query = pools(settings.pop("classes", ("cat", "dog")))
    options = dict(ways=2, shots=1, episodes=episodes, seed=0)
    options.update(settings)
    results = ResultsFile(tmp_path / "r.jsonl", "run", "episode") if tmp_path else None
    return evaluate_episodes(support, query, backend, load_template("completion"), FewshotSettings(**options),
                             WordTokenizer(), results)


def test_diagnostics_show_an_llm_that_always_answers_one_label(dog_gpt2):
    summary = run(dog_gpt2, calibrate=False)
    diagnostics = summary.diagnostics
    assert diagnostics["predicted"] == {"dog": 1.0}
    assert diagnostics["accuracy_by_class"]["dog"]["accuracy"] == 1.0
    assert diagnostics["accuracy_by_class"]["cat"]["accuracy"] == 0.0
    assert set(diagnostics["accuracy_by_label_position"]) == {"0", "1"}
    assert sum(diagnostics["predicted_position"].values()) == pytest.approx(1.0)
    assert diagnostics["mean_margin"] > 0 and 0 <= diagnostics["answers_last_example"] <= 1
    assert sum(cell["episodes"] for cell in diagnostics["accuracy_by_recency"].values()) == summary.episodes


CAT_WORDS = ["templar", "pal", "citadel", "baba", "manuel"]
DOG_WORDS = ["monastery", "codex", "pagoda", "operators", "referred"]


class ClassWords:
    """Stand-in LQAE tokenizer: ids 0-4 are cat words, 5-9 dog words."""

    def decode(self, ids, **kwargs):
        return " ".join((CAT_WORDS + DOG_WORDS)[i] for i in ids)


def word_pool(seed: int, prefix: str):
    rng = random.Random(seed)
    ids, labels, paths = [], [], []
    for label in range(2):
        for i in range(10):
            ids.append([5 * label + rng.randrange(5) for _ in range(5)])
            labels.append(label)
            paths.append(f"{prefix}/{label}/{i}.png")
    return TokenPool(ids, labels, ["cat", "dog"], paths, "words")


@pytest.fixture(scope="module")
def biased_reader():
    """A tiny GPT-2 that reads the input (cat words -> cat, dog words -> dog) but was taught with 60% of
    the cat inputs labelled dog: its answers lean to dog whatever it reads."""
    model, tokenizer = build_tiny_gpt2(seed=1)
    rng = random.Random(2)

    def batch() -> list[str]:
        texts = []
        for _ in range(16):
            is_cat = rng.random() < 0.5
            words = " ".join(rng.choice(CAT_WORDS if is_cat else DOG_WORDS) for _ in range(5))
            label = ("dog" if rng.random() < 0.6 else "cat") if is_cat else "dog"
            texts.append(f"Answer with one of: cat, dog.\nInput: {words}\nOutput: {label}\n###")
        return texts

    teach_answers(model, tokenizer, batch, steps=60)
    return HFBackend(model, tokenizer)


def test_calibration_removes_a_label_bias(biased_reader, tmp_path):
    def evaluate_words(calibrate, results=None):
        settings = FewshotSettings(ways=2, shots=1, episodes=40, seed=0, calibrate=calibrate)
        return evaluate_episodes(word_pool(0, "support"), word_pool(1, "query"), biased_reader,
                                 load_template("completion"), settings, ClassWords(), results)

    plain = evaluate_words(False)
    assert evaluate_words(None).accuracy == pytest.approx(evaluate_words(True).accuracy)  # on by default for loglik
    calibrated = evaluate_words(True, ResultsFile(tmp_path / "r.jsonl", "run", "episode"))
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    targets = Counter(r["target"] for r in records)
    assert 15 <= targets["dog"] <= 25  # balanced queries
    assert all(r["prior"]["dog"] > r["prior"]["cat"] for r in records)  # the bias, measured content-free
    assert plain.diagnostics["predicted"].get("dog", 0) >= 0.9  # biased: (nearly) always dog
    share = calibrated.diagnostics["predicted"].get("dog", 0)
    assert abs(share - targets["dog"] / 40) <= 0.15  # calibrated: answers follow the queries
    assert calibrated.accuracy >= plain.accuracy + 0.3


def test_calibration_costs_one_extra_request_per_support_set(dog_gpt2):
    calls = []
    original = dog_gpt2.loglik

    def counting(request):
        calls.append(len(request.prompts))
        return original(request)

    dog_gpt2.loglik = counting
    try:
        run(dog_gpt2, episodes=3, calibrate=True)
    finally:
        dog_gpt2.loglik = original
    assert calls == [1, 3] * 3  # the query, then the three content-free inputs in one request


def test_support_order_is_deterministic_and_similar_last_puts_the_nearest_last(tmp_path):
    orders = []
    for attempt in range(2):
        folder = tmp_path / f"random{attempt}"
        run(OverlapBackend(), episodes=12, tmp_path=folder.mkdir() or folder, classes=("a", "b", "c"), ways=3, shots=3)
        orders.append([json.loads(line)["order"] for line in (folder / "r.jsonl").read_text().splitlines()])
    assert orders[0] == orders[1] and len({tuple(o) for o in orders[0]}) > 1

    support, query = pools(("a", "b", "c"))
    settings = FewshotSettings(ways=3, shots=3, order="similar-last")
    supports = list(range(0, 24, 3))
    labels = ["a", "b", "c"]
    support_set = SupportSet(OverlapBackend(), load_template("completion"), settings, PromptImageText(WordTokenizer()),
                             support, supports, labels, [support.labels[i] for i in supports], [query.ids[0]], 3)
    ordered = support_set.ordered(supports, query.ids[0])
    overlap = [sum((Counter(query.ids[0]) & Counter(support.ids[i])).values()) for i in ordered]
    assert sorted(ordered) == sorted(supports) and overlap == sorted(overlap)
    assert support_set.ordered(supports, query.ids[0]) == ordered  # same query, same order


def test_constrained_generation_can_only_emit_a_label(dog_gpt2):
    labels = ["cat", "aardvark", "hippopotamus zebra"]  # the model wants "dog", which is not among them
    prompts = render(load_template("completion"), labels, [("templar pal", "cat"), ("baba", "aardvark")],
                     ["codex pal", "pal", "citadel baba"])
    request = Request(prompts, labels)
    free = dog_gpt2.generate(request, 4)
    assert all(reply.strip().startswith("dog") for reply in free)
    picks = dog_gpt2.constrained(request)
    assert len(picks) == 3 and all(0 <= p < len(labels) for p in picks)
    naive = HFBackend(dog_gpt2.model, dog_gpt2.tokenizer, reuse_prefix=False)
    assert naive.constrained(request) == picks
    summary = run(dog_gpt2, episodes=6, scoring="constrained")
    assert summary.unanswered == 0


def test_letter_labels_are_shown_instead_of_names(tmp_path):
    run(OverlapBackend(), episodes=4, tmp_path=tmp_path, labels="letters")
    for line in (tmp_path / "r.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert [record["shown"][name] for name in record["labels"]] == ["A", "B"]  # in the instruction's order


def test_settings_that_do_not_fit_together_are_refused():
    with pytest.raises(ConfigError, match="--calibrate"):
        FewshotSettings(calibrate=True, scoring="generate").check()
    with pytest.raises(ConfigError, match="unknown order"):
        FewshotSettings(order="alphabetical").check()


def test_frequent_image_text_lists_distinct_tokens_most_frequent_first(tmp_path):
    assert frequent_first([7, 3, 3, 9, 7, 3]) == [3, 7, 9]
    assert frequent_first([5, 6, 7]) == [5, 6, 7]
    support, query = pools()
    settings = FewshotSettings(image_text="frequent")
    image_text = PromptImageText(WordTokenizer(), settings.image_text)
    support_set = SupportSet(OverlapBackend(), load_template("completion"), settings, image_text,
                             support, [0, 8], ["cat", "dog"], [0, 1], [query.ids[0]], 1)
    text = support_set.text([4, 2, 2, 4, 4, 1], 2)
    assert text == "w4 w2"  # cut to two tokens: the rarest goes first


def test_defaults_calibrate_llms_only_and_keep_the_drawn_support_order(dog_gpt2):
    settings = FewshotSettings()
    assert settings.order == "random" and settings.calibrate is None
    assert settings.for_backend(dog_gpt2).calibrate is True
    assert settings.for_backend(OverlapBackend()).calibrate is False
    assert FewshotSettings(scoring="generate").for_backend(dog_gpt2).calibrate is False
    with pytest.raises(ConfigError, match="reads no prompt"):
        FewshotSettings(calibrate=True).for_backend(OverlapBackend())
