"""Labelling new query images from one support set fitted once to the context window."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from lqae.fewshot.backends.base import Backend
from lqae.fewshot.budget import Dropped
from lqae.fewshot.concurrency import check_concurrency, in_order
from lqae.fewshot.episodes import TokenPool, letter_labels, open_label_names, labelling_supports
from lqae.fewshot.prompts import Template
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.results import ResultsFile
from lqae.fewshot.settings import FewshotSettings
from lqae.fewshot.support import SupportSet

log = logging.getLogger(__name__)


@dataclass
class QueryLabel:
    """The label given to one query image."""

    path: str
    label: str | None  # class name; None when a generated reply names no label
    scores: dict[str, float]  # per class
    prompt_tokens: int
    generated: str | None = None  # the reply (generate scoring)


@dataclass
class LabelRun:
    """Every query's label, and how the support set was fitted."""

    predictions: list[QueryLabel]  # in query order
    supports: int  # support images in the prompt (after budget cuts)
    image_tokens: int  # tokens per image kept
    tokens_per_image: int  # tokens per image available
    dropped: Dropped
    resumed: int  # queries read back from the results file

    def as_dict(self) -> dict:
        return {
            "predictions": [asdict(p) for p in self.predictions], "supports": self.supports,
            "image_tokens": self.image_tokens, "dropped": self.dropped.as_dict(), "resumed": self.resumed,
        }


def content_id(ids: Sequence[int]) -> str:
    """A short id of a query's token ids: what the LLM is shown of it."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def label_queries(
    support: TokenPool,
    queries: TokenPool,
    backend: Backend,
    template: Template,
    settings: FewshotSettings,
    tokenizer,
    results: ResultsFile | None = None,
    on_label: Callable[[QueryLabel], None] | None = None,
    concurrency: int = 1,
) -> LabelRun:
    """Label every query image from one support set (`settings.shots` per class, all when None);
    `tokenizer` is the LQAE's LM tokenizer, which turns token ids into the text the LLM reads.

    The support set is fitted once against the longest query, so every query sees the same prompt
    prefix (and a local model computes it once). With `concurrency` > 1 that many queries are
    answered at once (a server's backend); records are still written and reported in query order."""
    settings = settings.for_backend(backend)
    check_concurrency(concurrency, backend)
    chosen = labelling_supports(support, settings.shots, settings.seed)
    classes = [c for c in support.classes if any(support.class_name(i) == c for i in chosen)]
    if settings.labels == "open":
        shown = open_label_names(classes, settings.seed)
    elif settings.labels == "letters":
        shown = letter_labels(len(classes))
    else:
        shown = classes
    if len(classes) == 1:
        log.warning("the support set has one class (%s): every query is given that label", classes[0])
    position = {name: j for j, name in enumerate(classes)}
    done = results.load() if results else {}
    # a query is known by its path and its tokens: a changed image at the same path is answered again
    keys = [(path, content_id(ids)) for path, ids in zip(queries.paths, queries.ids)]
    pending = [i for i, key in enumerate(keys) if key not in done]
    support_set = None
    if pending:
        shots = settings.shots or max(sum(1 for i in chosen if support.class_name(i) == c) for c in classes)
        text = PromptImageText(tokenizer, settings.image_text, support.layout, settings.global_weight)
        support_set = SupportSet(
            backend, template, settings, text, support, chosen, shown, [position[support.class_name(i)] for i in chosen],
            queries.ids, shots,
        )
    first: dict[tuple, int] = {}  # a query given twice (same path, same tokens) is answered once, at its first place
    for i in pending:
        first.setdefault(keys[i], i)
    answers = in_order(lambda index: support_set.answer([queries.ids[index]])[0], first.values(), concurrency)
    predictions = []
    for index, (path, content) in enumerate(keys):
        record = done.get((path, content))
        if record is None:
            answer = next(answers)
            record = answer.as_record(results.run if results else None, path, classes)
            record.update(label=answer.label(classes), content=content)
            if results:
                results.append(record)
            done[(path, content)] = record
        label = QueryLabel(path, record["label"], record["scores"], record["prompt_tokens"], record.get("generated"))
        predictions.append(label)
        if on_label:
            on_label(label)
    fit = support_set.fit if support_set else None
    return LabelRun(
        predictions, len(fit.supports) if fit else 0, fit.image_tokens if fit else support.tokens_per_image,
        support.tokens_per_image, fit.dropped if fit else Dropped(), len(queries) - len(pending),
    )
