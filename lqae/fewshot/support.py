"""A support set fitted to the context window once, answering queries from it: scoring, generation
and contextual calibration.

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

import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

from lqae.errors import LLMError
from lqae.fewshot.backends.base import Backend, Request, match_label
from lqae.fewshot.budget import Fit, fit_prompt
from lqae.fewshot.episodes import TokenPool, shared_tokens
from lqae.fewshot.prompts import Template, render
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.settings import FewshotSettings

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs; their prior is averaged


@dataclass
class Answer:
    """One query's outcome."""

    predicted: int | None  # index into the labels; None when a generated reply names no label
    scores: list[float]  # per label (generate: 1 for the named label, else 0)
    prompt_tokens: int  # LLM tokens of the prompt (0 without an LLM)
    generated: str | None = None  # the reply (generate scoring)
    order: list[int] = field(default_factory=list)  # support-pool indices in prompt order
    prior: list[float] | None = None  # calibration: each label's probability after content-free queries

    def label(self, classes: Sequence[str]) -> str | None:
        """The class answered (None when a generated reply names no label)."""
        return classes[self.predicted] if self.predicted is not None else None

    def as_record(self, run: str | None, query: str, classes: Sequence[str]) -> dict:
        """The results-file fields every answered query has, evaluated or labelled; `classes` name the labels."""
        record = {
            "run": run, "query": query, "scores": {name: round(s, 6) for name, s in zip(classes, self.scores)},
            "prompt_tokens": self.prompt_tokens,
        }
        if self.generated is not None:
            record["generated"] = self.generated
        return record


class SupportSet:
    """A support set fitted to the context window once; answers any number of queries from it."""

    def __init__(
        self,
        backend: Backend,
        template: Template,
        settings: FewshotSettings,
        text: PromptImageText,
        pool: TokenPool,
        supports: Sequence[int],
        labels: Sequence[str],
        support_labels: Sequence[int],
        fit_queries: Sequence[Sequence[int]],
        shots: int,
    ) -> None:
        """text: the images' token text as prompts show it (its mode, not `settings.image_text`, is
        used); supports: pool indices in prompt order; labels: shown to the LLM; support_labels: index
        into labels per support; fit_queries: token ids of every query this set will answer (the
        budget must hold for the longest)."""
        self.backend, self.template, self.settings, self.text = backend, template, settings, text
        self.pool, self.labels, self.shots = pool, list(labels), shots
        self._priors: dict[tuple[int, ...], list[float]] = {}
        label_of = dict(zip(supports, support_labels))
        self.label_of = label_of
        full = text.full_length(pool.tokens_per_image)
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
        limit = settings.context_tokens or backend.context_tokens or sys.maxsize  # None: no window to fit

        def measure(kept: Sequence[int], repeats: int, length: int) -> int:
            return max(backend.count(p) for p in self._prompts(kept, repeats, length, fit_queries)) + reserve

        classes = [str(label_of[i]) for i in supports]
        self.fit = fit_prompt(measure, supports, classes, settings.repeats, full, limit, settings.min_image_tokens)

    def _prompts(self, supports, repeats: int, length: int, queries: Sequence[Sequence[int]]):
        return self._prompts_for_texts(supports, repeats, length, [self.text(q, length) for q in queries])

    def _prompts_for_texts(self, supports, repeats: int, length: int, texts: Sequence[str]):
        examples = [(self.text(self.pool.ids[i], length), self.labels[self.label_of[i]]) for i in supports]
        return render(
            self.template, self.labels, examples, list(texts),
            induction=self.settings.induction, shots=self.shots, repeats=repeats, chat_format=self.backend.chat_format,
        )

    def answer(self, queries: Sequence[Sequence[int]]) -> list[Answer]:
        return [self._answer(list(query)) for query in queries]

    def _answer(self, query: list[int]) -> Answer:
        fit, backend, settings = self.fit, self.backend, self.settings
        supports = self.ordered(fit.supports, query)
        prompts = self._prompts(supports, fit.repeats, fit.image_tokens, [query]) if backend.reads_text else []
        text = self.text
        request = Request(
            prompts, self.labels, [text.shown(self.pool.ids[i]) for i in supports], [self.label_of[i] for i in supports],
            [text.shown(query)], layout=text.layout, global_weight=text.global_weight,
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
        _check_finite(scores, backend, "log-probabilities for the labels")
        prior = None
        if settings.calibrate:
            prior = self.prior(supports)
            scores = [s - math.log(p) for s, p in zip(_log_softmax(scores), prior)]
            _check_finite(scores, backend, "calibrated scores (its label prior underflowed)")
        return Answer(max(range(len(scores)), key=scores.__getitem__), scores, count, order=supports, prior=prior)

    def _scores(self, row: list[tuple[float, int]]) -> list[float]:
        return [value / max(n, 1) if self.settings.length_norm else value for value, n in row]

    def ordered(self, supports: Sequence[int], query: Sequence[int]) -> list[int]:
        """The supports in prompt order: as drawn, or with `similar-last` ascending by token overlap
        with the query (the token text's words, global words weighted; ties keep the drawn order), so
        the most similar one comes right before it."""
        if self.settings.order != "similar-last":
            return list(supports)
        bag = self.text.bag(query)
        return sorted(supports, key=lambda i: shared_tokens(bag, self.text.bag(self.pool.ids[i])))

    def prior(self, supports: Sequence[int]) -> list[float]:
        """Each label's probability after the content-free queries, averaged (one short forward each
        on the cached prefix of a local model); remembered for the same support order."""
        key = tuple(supports)
        prior = self._priors.get(key)  # one entry, replaced whole: safe when queries are answered in threads
        if prior is None:
            fit = self.fit
            prompts = self._prompts_for_texts(supports, fit.repeats, fit.image_tokens, CONTENT_FREE)
            rows = [self._scores(row) for row in self.backend.loglik(Request(prompts, self.labels))]
            for row in rows:
                _check_finite(row, self.backend, "log-probabilities after the content-free queries")
            probabilities = [[math.exp(v) for v in _log_softmax(row)] for row in rows]
            prior = [sum(column) / len(rows) for column in zip(*probabilities)]
            if min(prior) <= 0:  # a label no content-free query gives any probability: nothing to divide by
                raise LLMError(f"{self.backend.name} gives a label no probability at all after the content-free "
                               "queries; calibration cannot divide by it: pass --no-calibrate")
            self._priors = {key: prior}
        return prior


def _check_finite(scores: Sequence[float], backend, what: str) -> None:
    """An LLMError for NaN or infinite scores: no label is chosen from them, no accuracy counted."""
    if not all(math.isfinite(s) for s in scores):
        raise LLMError(f"{backend.name} gave {what} that are not finite ({list(scores)}); its scores cannot be trusted")


def _log_softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]
