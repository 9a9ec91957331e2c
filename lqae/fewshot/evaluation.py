"""Accuracy of an LLM (or the overlap baseline) over sampled N-way K-shot episodes, with what an
accuracy alone hides (`diagnose`) and a 95% interval (`wilson_interval`)."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from lqae.fewshot.backends.base import Backend
from lqae.fewshot.budget import Dropped
from lqae.fewshot.concurrency import check_concurrency, in_order
from lqae.fewshot.episodes import TokenPool, check_episode_setup, letter_labels, sample_episode
from lqae.fewshot.prompts import Template
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.results import ResultsFile
from lqae.fewshot.settings import FewshotSettings
from lqae.fewshot.support import SupportSet

EpisodeCallback = Callable[[dict, int, int], None]  # (record, done, total)
log = logging.getLogger(__name__)


@dataclass
class EvalSummary:
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson score interval
    episodes: int
    correct: int
    ways: int
    shots: int
    repeats: int
    chance: float
    mean_prompt_tokens: float | None  # None for a backend that reads no prompt (the overlap baseline)
    seconds_per_episode: float  # wall time over the episodes computed in this run (resumed ones excluded;
    # with --concurrency, several run at once, so each record's own "seconds" adds up to more)
    unanswered: int  # generate scoring: replies that start with no label
    resumed: int  # episodes read back from --out
    distinct_queries: int = 0  # query images among the episodes: the interval assumes one per episode
    dropped: dict = field(default_factory=dict)  # budget cuts: episodes affected and totals
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # see `diagnose`

    def as_dict(self) -> dict:
        data = asdict(self)
        data["interval"] = list(self.interval)
        return data


def evaluate_episodes(
    support: TokenPool,
    query: TokenPool,
    backend: Backend,
    template: Template,
    settings: FewshotSettings,
    tokenizer,
    results: ResultsFile | None = None,
    on_result: EpisodeCallback | None = None,
    concurrency: int = 1,
) -> EvalSummary:
    """Accuracy over `settings.episodes` N-way K-shot episodes (one query each); `tokenizer` is the
    LQAE's LM tokenizer, which turns token ids into the text the LLM reads. With `results`, episodes
    already there are read back instead of run again. With `concurrency` > 1 that many episodes are
    answered at once (a server's backend); records are still written and reported in episode order."""
    settings = settings.for_backend(backend)
    check_concurrency(concurrency, backend)
    shots = settings.shots or 1
    eligible = check_episode_setup(support, query, settings.ways, shots)
    text = PromptImageText(tokenizer, settings.image_text, support.layout, settings.global_weight)
    done = results.load() if results else {}

    def run(index: int) -> dict:
        return _run_episode(index, support, query, backend, template, settings, shots, text, eligible, results)[0]

    answered = in_order(run, [i for i in range(settings.episodes) if i not in done], concurrency)
    records, resumed, computed, started = [], 0, 0, time.perf_counter()
    for index in range(settings.episodes):
        record = done.get(index)
        if record is not None:
            resumed += 1
        else:
            record = next(answered)
            computed += 1
            if results:
                results.append(record)
        records.append(record)
        if on_result:
            on_result(record, index + 1, settings.episodes)
    seconds_per_episode = (time.perf_counter() - started) / computed if computed else 0.0
    return _summarize(records, settings, shots, resumed, seconds_per_episode, backend.reads_text)


def _run_episode(
    index: int, support: TokenPool, query: TokenPool, backend: Backend, template: Template, settings: FewshotSettings,
    shots: int, text: PromptImageText, eligible: list[str], results: ResultsFile | None,
) -> tuple[dict, float]:
    """Episode `index` answered: (its results-file record, seconds it took)."""
    open_labels = settings.labels == "open"
    episode = sample_episode(support, query, settings.ways, shots, settings.seed, index, eligible, open_labels)
    if settings.labels == "letters":
        episode = replace(episode, shown=tuple(letter_labels(len(episode.classes))))
    started = time.perf_counter()
    position = {name: j for j, name in enumerate(episode.classes)}
    query_ids = query.ids[episode.query]
    support_set = SupportSet(
        backend, template, settings, text, support, episode.supports, episode.shown,
        [position[support.class_name(i)] for i in episode.supports], [query_ids], shots,
    )
    answer = support_set.answer([query_ids])[0]
    seconds = time.perf_counter() - started
    predicted = answer.label(episode.classes)
    fit = support_set.fit
    record = answer.as_record(results.run if results else None, query.paths[episode.query], episode.classes)
    record.update({
        "episode": index, "target": episode.target, "predicted": predicted, "correct": predicted == episode.target,
        "labels": list(episode.classes), "order": [support.class_name(i) for i in answer.order],
        "supports": len(fit.supports), "image_tokens": fit.image_tokens, "repeats": fit.repeats,
        "dropped": fit.dropped.as_dict(), "seconds": round(seconds, 4),
    })
    if settings.labels != "real":
        record["shown"] = dict(zip(episode.classes, episode.shown))
    if answer.prior is not None:
        record["prior"] = {name: round(p, 6) for name, p in zip(episode.classes, answer.prior)}
    return record, seconds


def _summarize(
    records: list[dict], settings: FewshotSettings, shots: int, resumed: int, seconds_per_episode: float,
    reads_text: bool = True,
) -> EvalSummary:
    total = len(records)
    correct = sum(1 for r in records if r["correct"])
    distinct = len({r["query"] for r in records})
    if total >= 2 * distinct:  # a few repeats among many queries hardly narrow the interval
        log.warning(
            "the 95%% interval assumes %d independent episodes, but they reuse %d query image(s) (about %.0f "
            "times each) and the same supports: accuracy on new images is less certain than it says; "
            "draw queries from a larger --query set", total, distinct, total / max(1, distinct),
        )
    cuts = [Dropped(**r["dropped"]) for r in records]
    dropped = {
        "episodes": sum(1 for c in cuts if c.any()),
        "repeats": sum(c.repeats for c in cuts),
        "shortened_episodes": sum(1 for c in cuts if c.image_tokens),
        "image_tokens": sum(c.image_tokens for c in cuts),
        "shots": sum(c.shots for c in cuts),
    }
    settings_dict = asdict(settings)
    settings_dict["shots"] = shots
    return EvalSummary(
        accuracy=correct / total if total else 0.0, interval=wilson_interval(correct, total), episodes=total,
        correct=correct, ways=settings.ways, shots=shots, repeats=settings.repeats, chance=1 / settings.ways,
        mean_prompt_tokens=sum(r["prompt_tokens"] for r in records) / total if total and reads_text else None,
        seconds_per_episode=seconds_per_episode,
        unanswered=sum(1 for r in records if r["predicted"] is None), resumed=resumed, distinct_queries=distinct,
        dropped=dropped,
        settings=settings_dict, diagnostics=diagnose(records, settings.scoring == "loglik", reads_text),
    )


def diagnose(records: list[dict], with_margin: bool = True, reads_text: bool = True) -> dict:
    """What an accuracy alone hides: which labels the LLM answers (a model that always says the first,
    the last or one favourite label shows here), accuracy by the query's class, by the position of the
    right label in the instruction's list, and by how recently its example was shown (0 = its class
    had the last example before the query), the share of answers naming the last example's class,
    and the mean margin between the best and second-best score. A backend that reads no prompt
    (`reads_text` False: the overlap baseline) has no last example."""

    def share(counts: Counter) -> dict:
        total = sum(counts.values())
        return {str(k): round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))}

    def accuracy_by(key) -> dict:
        groups: dict = {}
        for record in records:
            group = key(record)
            if group is not None:
                groups.setdefault(group, []).append(record["correct"])
        return {str(k): {"accuracy": round(sum(v) / len(v), 4), "episodes": len(v)} for k, v in sorted(groups.items())}

    def labels_of(record) -> list[str]:
        return record.get("labels") or list(record["scores"])

    def recency(record, name) -> int | None:
        order = record.get("order")
        if not order or name not in order:
            return None
        last = {cls: position for position, cls in enumerate(order)}
        return sum(1 for position in last.values() if position > last[name])

    margins = []
    for record in records:
        values = sorted(record["scores"].values(), reverse=True)
        if with_margin and len(values) > 1 and all(math.isfinite(v) for v in values[:2]):
            margins.append(values[0] - values[1])
    with_order = [r for r in records if r.get("order")] if reads_text else []
    return {
        "predicted": share(Counter(r["predicted"] or "?" for r in records)),
        "predicted_position": share(Counter(
            labels_of(r).index(r["predicted"]) for r in records if r["predicted"] in labels_of(r)
        )),
        "accuracy_by_class": accuracy_by(lambda r: r["target"]),
        "accuracy_by_label_position": accuracy_by(lambda r: labels_of(r).index(r["target"])),
        "accuracy_by_recency": accuracy_by(lambda r: recency(r, r["target"])),
        "answers_last_example": round(
            sum(1 for r in with_order if r["predicted"] == r["order"][-1]) / len(with_order), 4
        ) if with_order else None,
        "mean_margin": round(sum(margins) / len(margins), 4) if margins else None,
    }


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sound at small n and near 0 or 1)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))
