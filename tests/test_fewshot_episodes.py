"""Episodes (deterministic under the seed), the overlap baseline, evaluation bookkeeping and resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lqae.errors import ConfigError
from lqae.fewshot.backends import OverlapBackend, Request, make_backend, match_label
from lqae.fewshot.episodes import check_episode_setup, sample_episode
from lqae.fewshot.evaluation import evaluate_episodes, wilson_interval
from lqae.fewshot.labelling import label_queries
from lqae.fewshot.prompts import load_template
from lqae.fewshot.results import ResultsFile
from lqae.fewshot.settings import FewshotSettings
from test_fewshot_helpers import WordTokenizer, synthetic_pool


def episodes(support, query, n, seed, ways=3, shots=2):
    return [sample_episode(support, query, ways, shots, seed, i) for i in range(n)]


def test_episodes_are_deterministic_under_the_seed():
    support, query = synthetic_pool(), synthetic_pool(prefix="val", seed=1)
    first = episodes(support, query, 20, seed=0)
    assert first == episodes(support, query, 20, seed=0)
    assert first[:10] == episodes(support, query, 10, seed=0)  # episode i does not depend on the count
    assert first != episodes(support, query, 20, seed=1)


def test_episode_structure():
    support, query = synthetic_pool(), synthetic_pool(prefix="val", seed=1)
    for episode in episodes(support, query, 30, seed=3, ways=3, shots=2):
        assert len(set(episode.classes)) == 3 and episode.target in episode.classes
        assert query.class_name(episode.query) == episode.target
        support_classes = [support.class_name(i) for i in episode.supports]
        assert sorted(support_classes) == sorted(list(episode.classes) * 2)
        assert episode.shown == episode.classes


def test_same_pool_never_uses_the_query_as_its_own_support():
    pool = synthetic_pool(per_class=2)
    for episode in episodes(pool, pool, 50, seed=0, ways=2, shots=1):
        assert episode.query not in episode.supports


def test_open_labels_are_nonsense_words_per_episode():
    support, query = synthetic_pool(), synthetic_pool(prefix="val", seed=1)
    episode = sample_episode(support, query, 3, 1, 0, 0, open_labels=True)
    assert len(set(episode.shown)) == 3 and not set(episode.shown) & set(support.classes)


def test_not_enough_classes_or_shots_is_a_clear_error():
    support, query = synthetic_pool(per_class=2), synthetic_pool(prefix="val", seed=1)
    with pytest.raises(ConfigError, match="6-way 1-shot episodes need 6 classes"):
        check_episode_setup(support, query, 6, 1)
    with pytest.raises(ConfigError, match="only 0 qualify"):
        check_episode_setup(support, query, 2, 5)


def test_overlap_recovers_classes_only_when_tokens_carry_them():
    settings = FewshotSettings(ways=5, shots=1, episodes=60, seed=0)
    tokenizer, template, backend = WordTokenizer(), load_template("completion"), OverlapBackend()
    informative = evaluate_episodes(
        synthetic_pool(), synthetic_pool(prefix="val", seed=1), backend, template, settings, tokenizer
    )
    random_tokens = evaluate_episodes(
        synthetic_pool(informative=False), synthetic_pool(prefix="val", seed=1, informative=False), backend, template,
        settings, tokenizer,
    )
    assert informative.accuracy > 0.9
    assert random_tokens.accuracy < 0.5  # chance is 0.2
    assert informative.chance == pytest.approx(0.2) and informative.mean_prompt_tokens is None  # no prompt
    assert informative.diagnostics["answers_last_example"] is None  # it reads no examples in an order


def test_overlap_scores_the_best_matching_support():
    request = Request([], ["a", "b"], support_ids=[[1, 2, 3, 4], [5, 6, 7, 8], [1, 9, 9, 9]], support_labels=[0, 1, 1],
                      query_ids=[[5, 6, 7, 1]])
    scores = OverlapBackend().loglik(request)[0]
    assert scores[1][0] > scores[0][0]
    assert OverlapBackend().generate(request, 4) == ["b"]


def test_make_backend_unknown_form_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        make_backend("gpt5")
    assert "hf:NAME_OR_PATH" in str(info.value) and "openai:MODEL" in str(info.value) and "overlap" in str(info.value)


def test_match_label_takes_the_longest_prefix():
    labels = ["one", "one hundred", "two"]
    assert match_label(" One hundred!", labels) == 1
    assert match_label('"two"', labels) == 2
    assert match_label("three", labels) is None


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.19, abs=0.01)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)  # the textbook value


def test_results_file_resumes_and_survives_a_half_written_line(tmp_path):
    support, query = synthetic_pool(), synthetic_pool(prefix="val", seed=1)
    tokenizer, template, backend = WordTokenizer(), load_template("completion"), OverlapBackend()
    settings = FewshotSettings(ways=3, shots=1, episodes=12, seed=0)
    path = tmp_path / "results.jsonl"
    full = evaluate_episodes(
        support, query, backend, template, settings, tokenizer, ResultsFile(path, "run1", "episode")
    )
    lines = path.read_text().splitlines()
    assert len(lines) == 12 and [json.loads(l)["episode"] for l in lines] == list(range(12))

    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while writing line 6
    seen = []
    again = evaluate_episodes(
        support, query, backend, template, settings, tokenizer, ResultsFile(path, "run1", "episode"),
        on_result=lambda record, done, total: seen.append(done),
    )
    assert again.resumed == 5 and seen == list(range(1, 13))
    assert again.accuracy == full.accuracy
    assert path.read_text().splitlines()[:5] == lines[:5] and len(path.read_text().splitlines()) == 12

    longer = evaluate_episodes(
        support, query, backend, template, replace(settings, episodes=15), tokenizer, ResultsFile(path, "run1", "episode")
    )
    assert longer.resumed == 12 and longer.episodes == 15

    with pytest.raises(ConfigError, match="other settings"):
        evaluate_episodes(
            support, query, backend, template, settings, tokenizer, ResultsFile(path, "run2", "episode")
        )


def test_labelling_uses_every_class_and_labels_queries():
    support = synthetic_pool()
    queries = synthetic_pool(prefix="new", seed=5)
    queries = replace(queries, labels=[-1] * len(queries), classes=[])
    tokenizer, template = WordTokenizer(), load_template("completion")
    run = label_queries(support, queries, OverlapBackend(), template, FewshotSettings(shots=3), tokenizer)
    assert len(run.predictions) == len(queries) and run.supports == 15
    truth = [p.split("/")[1] for p in queries.paths]
    assert sum(p.label == t for p, t in zip(run.predictions, truth)) >= 0.9 * len(truth)


class FixedScores(OverlapBackend):
    """Reads no text; label 0 scores -4 over 4 tokens, label 1 scores -3 over 1 token."""

    def loglik(self, request):
        return [[(-4.0, 4), (-3.0, 1)] for _ in request.query_ids]


@pytest.mark.parametrize("length_norm, expected", [(False, 1), (True, 0)])
def test_length_normalisation_changes_the_winner(length_norm, expected):
    support, query = synthetic_pool(classes=("a", "b")), synthetic_pool(classes=("a", "b"), prefix="val", seed=1)
    records = []
    evaluate_episodes(support, query, FixedScores(), load_template("completion"),
                      FewshotSettings(ways=2, episodes=4, length_norm=length_norm), WordTokenizer(),
                      on_result=lambda record, *_: records.append(record))
    sample = sample_episode(support, query, 2, 1, 0, 0)
    assert records[0]["predicted"] == sample.classes[expected]


def test_open_labels_evaluate_and_record_what_was_shown():
    support, query = synthetic_pool(), synthetic_pool(prefix="val", seed=1)
    records = []
    summary = evaluate_episodes(support, query, OverlapBackend(), load_template("completion"),
                                FewshotSettings(ways=3, episodes=10, labels="open"), WordTokenizer(),
                                on_result=lambda record, *_: records.append(record))
    assert summary.accuracy > 0.8
    assert all(set(r["shown"]) == set(r["scores"]) and not set(r["shown"].values()) & set(support.classes)
               for r in records)


def test_a_few_repeated_queries_do_not_warn_but_heavy_reuse_does(caplog):
    """The interval's caveat is for episodes that reuse their queries many times over, not for the
    odd repeat among many distinct ones."""
    support, query = synthetic_pool(per_class=6), synthetic_pool(prefix="val", seed=1, per_class=6)
    template, tokenizer = load_template("completion"), WordTokenizer()
    with caplog.at_level("WARNING", logger="lqae"):
        evaluate_episodes(support, query, OverlapBackend(), template, FewshotSettings(ways=3, shots=1, episodes=12), tokenizer)
    assert "independent episodes" not in caplog.text  # 18 query images, 12 episodes: at most a repeat or two
    with caplog.at_level("WARNING", logger="lqae"):
        evaluate_episodes(support, query, OverlapBackend(), template, FewshotSettings(ways=3, shots=1, episodes=60), tokenizer)
    assert "assumes 60 independent episodes" in caplog.text
