"""Few-shot classification: label new images from a support set, or evaluate on sampled episodes.

Scoring (METHOD.md): `loglik` sums the log-probabilities of each label's tokens after the prompt
(optionally divided by their count, `length_norm`) and takes the arg-max; `generate` decodes
greedily and the reply must start with a label (as the paper scored GPT-3); a reply that starts
with none counts as wrong; `constrained` decodes greedily among the label tokens only (as V2L), so
the reply is always a label.

Calibration (Zhao et al. 2021, "Calibrate Before Use"): the labels' probabilities after
content-free queries (`N/A`, an empty input, `[MASK]`), averaged, are the prompt's prior; each
query's label probabilities are divided by it before the arg-max. Ordering `similar-last` puts the
support whose tokens overlap the query's most right before the query (KATE-style selection).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from lqae.errors import ConfigError
from lqae.fewshot.backends import Backend, Request, match_label
from lqae.fewshot.budget import Dropped, Fit, fit_prompt
from lqae.fewshot.episodes import (
    TokenPool, TokenTextDecoder, check_episode_setup, letter_labels, open_label_names, prediction_supports,
    sample_episode, shared_tokens,
)
from lqae.fewshot.prompts import Template, render

SCORING = ("loglik", "generate", "constrained")
LABEL_MODES = ("real", "open", "letters")
ORDERS = ("random", "similar-last")
IMAGE_TEXTS = ("sequence", "frequent")
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs; their prior is averaged


@dataclass
class FewshotSettings:
    """Protocol and scoring settings shared by prediction and evaluation."""

    ways: int = 2  # classes per episode (evaluation)
    shots: int | None = 1  # supports per class; None = every support image (prediction)
    episodes: int = 200  # episodes to evaluate
    seed: int = 0  # episode sampling, support choice, open-label assignment
    repeats: int = 0  # extra copies of the support block (Frozen protocol: 0, 1, 3, 5)
    induction: bool = True  # the template's [instruction] line before the examples
    scoring: str = "loglik"  # "loglik" or "generate"
    labels: str = "real"  # "real" (class folder names), "open" (nonsense words), "letters" (A, B, ...)
    # divide out the label prior measured after content-free queries; None = on wherever it applies
    # (loglik scoring with an LLM), as it helps most with the default LLM (README, "Measured figures")
    calibrate: bool | None = None
    order: str = "similar-last"  # "similar-last" (most token overlap with the query last) or "random" (as drawn)
    image_text: str = "sequence"  # "sequence" (patch order) or "frequent" (distinct tokens, most frequent first)
    length_norm: bool = False  # loglik per label token instead of summed
    context_tokens: int | None = None  # None = the backend's window
    min_image_tokens: int | None = None  # shortest token text per image when fitting; None = half
    max_new_tokens: int | None = None  # generation; None = longest label + 4 tokens

    def check(self) -> None:
        if self.scoring not in SCORING:
            raise ConfigError(f"unknown scoring {self.scoring!r}; choose one of: {', '.join(SCORING)}")
        if self.labels not in LABEL_MODES:
            raise ConfigError(f"unknown label mode {self.labels!r}; choose one of: {', '.join(LABEL_MODES)}")
        if self.image_text not in IMAGE_TEXTS:
            raise ConfigError(f"unknown image text {self.image_text!r}; choose one of: {', '.join(IMAGE_TEXTS)}")
        if self.order not in ORDERS:
            raise ConfigError(f"unknown order {self.order!r}; choose one of: {', '.join(ORDERS)}")
        if self.calibrate and self.scoring != "loglik":
            raise ConfigError("--calibrate divides out the label prior of log-likelihood scores; use --scoring loglik")

    def for_backend(self, backend: Backend) -> "FewshotSettings":
        """A copy with the automatic choices made (calibration on for loglik scoring by an LLM); settings
        the backend cannot honour are a ConfigError."""
        self.check()
        if self.calibrate and not backend.reads_text:
            raise ConfigError(f"--calibrate measures an LLM's label prior; {backend.name} reads no prompt")
        if self.scoring == "constrained" and not backend.supports_constrained:
            raise ConfigError(f"{backend.name} cannot restrict generation to the labels; use --scoring loglik or generate")
        calibrate = self.calibrate if self.calibrate is not None else self.scoring == "loglik" and backend.reads_text
        return replace(self, calibrate=calibrate)
        for name in ("episodes", "context_tokens", "min_image_tokens", "max_new_tokens", "shots"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.repeats < 0:
            raise ConfigError(f"--repeats must be 0 or more, got {self.repeats}")


@dataclass
class Answer:
    """One query's outcome."""

    predicted: int | None  # index into the labels; None when a generated reply names no label
    scores: list[float]  # per label (generate: 1 for the named label, else 0)
    prompt_tokens: int  # LLM tokens of the prompt (0 without an LLM)
    generated: str | None = None  # the reply (generate scoring)
    order: list[int] = field(default_factory=list)  # support-pool indices in prompt order
    prior: list[float] | None = None  # calibration: each label's probability after content-free queries


class SupportSet:
    """A support set fitted to the context window once; answers any number of queries from it."""

    def __init__(
        self,
        backend: Backend,
        template: Template,
        settings: FewshotSettings,
        text: TokenTextDecoder,
        pool: TokenPool,
        supports: Sequence[int],
        labels: Sequence[str],
        support_labels: Sequence[int],
        fit_queries: Sequence[Sequence[int]],
        shots: int,
    ) -> None:
        """supports: pool indices in prompt order; labels: shown to the LLM; support_labels: index into
        labels per support; fit_queries: token ids of every query this set will answer (the budget
        must hold for the longest)."""
        self.backend, self.template, self.settings, self.text = backend, template, settings, text
        self.pool, self.labels, self.shots = pool, list(labels), shots
        self._priors: dict[tuple[int, ...], list[float]] = {}
        label_of = dict(zip(supports, support_labels))
        self.label_of = label_of
        full = pool.tokens_per_image
        if settings.scoring == "generate" and backend.reads_text:
            longest = max(backend.count_text(label) for label in self.labels)
            self.max_new_tokens = settings.max_new_tokens or longest + 4
            reserve = self.max_new_tokens
        else:
            self.max_new_tokens = settings.max_new_tokens or 1
            reserve = max(backend.count_text(template.delimiter + l) for l in self.labels) if backend.reads_text else 0
        if not backend.reads_text:
            self.fit = Fit(list(supports), settings.repeats, full, 0)
            return
        limit = settings.context_tokens or backend.context_tokens

        def measure(kept: Sequence[int], repeats: int, length: int) -> int:
            return max(backend.count(p) for p in self._prompts(kept, repeats, length, fit_queries)) + reserve

        classes = [str(label_of[i]) for i in supports]
        self.fit = fit_prompt(measure, supports, classes, settings.repeats, full, limit, settings.min_image_tokens)

    def _prompts(self, supports, repeats: int, length: int, queries: Sequence[Sequence[int]]):
        return self._prompts_for_texts(supports, repeats, length, [self.image_text(q, length) for q in queries])

    def _prompts_for_texts(self, supports, repeats: int, length: int, texts: Sequence[str]):
        examples = [(self.image_text(self.pool.ids[i], length), self.labels[self.label_of[i]]) for i in supports]
        return render(
            self.template, self.labels, examples, list(texts),
            induction=self.settings.induction, shots=self.shots, repeats=repeats, chat_format=self.backend.chat_format,
        )

    def image_text(self, ids: Sequence[int], length: int) -> str:
        """An image's token text, cut to `length` tokens: in patch order, or with `image_text=frequent`
        its distinct tokens, most frequent first (so a cut drops the rarest)."""
        if self.settings.image_text == "frequent":
            ids = frequent_first(ids)
        return self.text(ids, length)

    def answer(self, queries: Sequence[Sequence[int]]) -> list[Answer]:
        return [self._answer(list(query)) for query in queries]

    def _answer(self, query: list[int]) -> Answer:
        fit, backend, settings = self.fit, self.backend, self.settings
        supports = self.ordered(fit.supports, query)
        prompts = self._prompts(supports, fit.repeats, fit.image_tokens, [query]) if backend.reads_text else []
        request = Request(
            prompts, self.labels, [self.pool.ids[i] for i in supports], [self.label_of[i] for i in supports], [query],
        )
        count = backend.count(prompts[0]) if prompts else 0
        if settings.scoring == "constrained":
            chosen = backend.constrained(request)[0]
            scores = [1.0 if j == chosen else 0.0 for j in range(len(self.labels))]
            return Answer(chosen, scores, count, self.labels[chosen], supports)
        if settings.scoring == "generate" and backend.reads_text:
            reply = backend.generate(request, self.max_new_tokens)[0]
            chosen = match_label(reply, self.labels)
            scores = [1.0 if j == chosen else 0.0 for j in range(len(self.labels))]
            return Answer(chosen, scores, count, reply, supports)
        scores = self._scores(backend.loglik(request)[0])
        prior = None
        if settings.calibrate:
            prior = self.prior(supports)
            scores = [s - math.log(p) for s, p in zip(_log_softmax(scores), prior)]
        return Answer(max(range(len(scores)), key=scores.__getitem__), scores, count, order=supports, prior=prior)

    def _scores(self, row: list[tuple[float, int]]) -> list[float]:
        return [value / max(n, 1) if self.settings.length_norm else value for value, n in row]

    def ordered(self, supports: Sequence[int], query: Sequence[int]) -> list[int]:
        """The supports in prompt order: as drawn, or with `similar-last` ascending by token overlap
        with the query (ties keep the drawn order), so the most similar one comes right before it."""
        if self.settings.order != "similar-last":
            return list(supports)
        bag = Counter(query)
        return sorted(supports, key=lambda i: shared_tokens(bag, Counter(self.pool.ids[i])))

    def prior(self, supports: Sequence[int]) -> list[float]:
        """Each label's probability after the content-free queries, averaged (one short forward each
        on the cached prefix of a local model); remembered for the same support order."""
        key = tuple(supports)
        if key not in self._priors:
            fit = self.fit
            prompts = self._prompts_for_texts(supports, fit.repeats, fit.image_tokens, CONTENT_FREE)
            rows = self.backend.loglik(Request(prompts, self.labels))
            probabilities = [[math.exp(v) for v in _log_softmax(self._scores(row))] for row in rows]
            self._priors = {key: [sum(column) / len(rows) for column in zip(*probabilities)]}
        return self._priors[key]


def frequent_first(ids: Sequence[int]) -> list[int]:
    """Distinct ids by count, most frequent first; ties keep their first position."""
    counts = Counter(ids)
    return sorted(counts, key=lambda token: -counts[token])  # Counter keeps first-seen order; sort is stable


def _log_softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


# -- results file ----------------------------------------------------------------------------
class ResultsFile:
    """JSON lines, one per finished episode or query, each tagged with the run's fingerprint.

    A rerun with the same settings skips what is there; a half-written last line (a kill mid-write)
    is cut off; lines from other settings are an error rather than a silent mix.
    """

    def __init__(self, path: str | Path, run: str, key: str) -> None:
        self.path, self.run, self.key = Path(path), run, key

    def load(self) -> dict:
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        done = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{self.path} line {number} is not JSON ({exc}); remove it or use another --out") from exc
            if record.get("run") != self.run:
                raise ConfigError(
                    f"{self.path} holds results of another run (other settings, model weights or data: run "
                    f"{record.get('run')}, this run {self.run}); use another --out, or delete the file to start over"
                )
            done[record[self.key]] = record
        return done

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def fingerprint(**parts) -> str:
    """A short id of everything that decides a run's results (not the episode count: a longer rerun resumes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- evaluation ------------------------------------------------------------------------------
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
    mean_prompt_tokens: float
    seconds_per_episode: float  # over the episodes computed in this run (resumed ones excluded)
    unanswered: int  # generate scoring: replies that start with no label
    resumed: int  # episodes read back from --out
    dropped: dict = field(default_factory=dict)  # budget cuts: episodes affected and totals
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # see `diagnose`

    def as_dict(self) -> dict:
        data = asdict(self)
        data["interval"] = list(self.interval)
        return data


ResultCallback = Callable[[dict, int, int], None]  # (record, done, total)


def evaluate(
    support: TokenPool,
    query: TokenPool,
    backend: Backend,
    template: Template,
    settings: FewshotSettings,
    text: TokenTextDecoder,
    results: ResultsFile | None = None,
    on_result: ResultCallback | None = None,
) -> EvalSummary:
    """Accuracy over `settings.episodes` N-way K-shot episodes (one query each)."""
    settings = settings.for_backend(backend)
    shots = settings.shots or 1
    eligible = check_episode_setup(support, query, settings.ways, shots)
    done = results.load() if results else {}
    records, resumed, computed_seconds = [], 0, []
    for index in range(settings.episodes):
        record = done.get(index)
        if record is not None:
            resumed += 1
        else:
            episode = sample_episode(
                support, query, settings.ways, shots, settings.seed, index, eligible, settings.labels == "open"
            )
            if settings.labels == "letters":
                episode = replace(episode, shown=tuple(letter_labels(len(episode.classes))))
            started = time.perf_counter()
            position = {name: j for j, name in enumerate(episode.classes)}
            support_set = SupportSet(
                backend, template, settings, text, support, episode.supports, episode.shown,
                [position[support.class_name(i)] for i in episode.supports], [query.ids[episode.query]], shots,
            )
            answer = support_set.answer([query.ids[episode.query]])[0]
            seconds = time.perf_counter() - started
            computed_seconds.append(seconds)
            predicted = episode.classes[answer.predicted] if answer.predicted is not None else None
            record = {
                "run": results.run if results else None, "episode": index, "query": query.paths[episode.query],
                "target": episode.target, "predicted": predicted, "correct": predicted == episode.target,
                "scores": {name: round(s, 6) for name, s in zip(episode.classes, answer.scores)},
                "labels": list(episode.classes), "order": [support.class_name(i) for i in answer.order],
                "prompt_tokens": answer.prompt_tokens, "supports": len(support_set.fit.supports),
                "image_tokens": support_set.fit.image_tokens, "repeats": support_set.fit.repeats,
                "dropped": support_set.fit.dropped.as_dict(), "seconds": round(seconds, 4),
            }
            if settings.labels != "real":
                record["shown"] = dict(zip(episode.classes, episode.shown))
            if answer.prior is not None:
                record["prior"] = {name: round(p, 6) for name, p in zip(episode.classes, answer.prior)}
            if answer.generated is not None:
                record["generated"] = answer.generated
            if results:
                results.append(record)
        records.append(record)
        if on_result:
            on_result(record, index + 1, settings.episodes)
    return _summarize(records, settings, shots, resumed, computed_seconds)


def _summarize(records: list[dict], settings: FewshotSettings, shots: int, resumed: int, seconds: list[float]) -> EvalSummary:
    total = len(records)
    correct = sum(1 for r in records if r["correct"])
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
        mean_prompt_tokens=sum(r["prompt_tokens"] for r in records) / total if total else 0.0,
        seconds_per_episode=sum(seconds) / len(seconds) if seconds else 0.0,
        unanswered=sum(1 for r in records if r["predicted"] is None), resumed=resumed, dropped=dropped,
        settings=settings_dict, diagnostics=diagnose(records, settings.scoring == "loglik"),
    )


def diagnose(records: list[dict], with_margin: bool = True) -> dict:
    """What an accuracy alone hides: which labels the LLM answers (a model that always says the first,
    the last or one favourite label shows here), accuracy by the query's class, by the position of the
    right label in the instruction's list, and by how recently its example was shown (0 = its class
    had the last example before the query), the share of answers naming the last example's class,
    and the mean margin between the best and second-best score."""

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
    with_order = [r for r in records if r.get("order")]
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


# -- prediction ------------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    label: str | None  # class name; None when a generated reply names no label
    scores: dict[str, float]
    prompt_tokens: int
    generated: str | None = None


@dataclass
class PredictionRun:
    predictions: list[Prediction]
    supports: int  # support images in the prompt (after budget cuts)
    image_tokens: int  # tokens per image kept
    tokens_per_image: int  # tokens per image available
    dropped: Dropped
    resumed: int

    def as_dict(self) -> dict:
        return {
            "predictions": [asdict(p) for p in self.predictions], "supports": self.supports,
            "image_tokens": self.image_tokens, "dropped": self.dropped.as_dict(), "resumed": self.resumed,
        }


def predict(
    support: TokenPool,
    queries: TokenPool,
    backend: Backend,
    template: Template,
    settings: FewshotSettings,
    text: TokenTextDecoder,
    results: ResultsFile | None = None,
    on_prediction: Callable[[Prediction], None] | None = None,
) -> PredictionRun:
    """Label every query image from one support set (`settings.shots` per class, all when None).

    The support set is fitted once against the longest query, so every query sees the same prompt
    prefix (and a local model computes it once)."""
    settings = settings.for_backend(backend)
    chosen = prediction_supports(support, settings.shots, settings.seed)
    classes = [c for c in support.classes if any(support.class_name(i) == c for i in chosen)]
    shown = {"open": lambda: open_label_names(classes, settings.seed), "letters": lambda: letter_labels(len(classes))}.get(
        settings.labels, lambda: classes
    )()
    position = {name: j for j, name in enumerate(classes)}
    done = results.load() if results else {}
    pending = [i for i, path in enumerate(queries.paths) if path not in done]
    support_set = None
    if pending:
        shots = settings.shots or max(sum(1 for i in chosen if support.class_name(i) == c) for c in classes)
        support_set = SupportSet(
            backend, template, settings, text, support, chosen, shown, [position[support.class_name(i)] for i in chosen],
            queries.ids, shots,
        )
    predictions = []
    for index, path in enumerate(queries.paths):
        record = done.get(path)
        if record is None:
            answer = support_set.answer([queries.ids[index]])[0]
            label = classes[answer.predicted] if answer.predicted is not None else None
            record = {
                "run": results.run if results else None, "query": path, "label": label,
                "scores": {name: round(s, 6) for name, s in zip(classes, answer.scores)},
                "prompt_tokens": answer.prompt_tokens,
            }
            if answer.generated is not None:
                record["generated"] = answer.generated
            if results:
                results.append(record)
            done[path] = record
        prediction = Prediction(path, record["label"], record["scores"], record["prompt_tokens"], record.get("generated"))
        predictions.append(prediction)
        if on_prediction:
            on_prediction(prediction)
    fit = support_set.fit if support_set else None
    return PredictionRun(
        predictions, len(fit.supports) if fit else 0, fit.image_tokens if fit else support.tokens_per_image,
        support.tokens_per_image, fit.dropped if fit else Dropped(), len(queries) - len(pending),
    )
