"""Fitting an episode into the LLM's context window. (Counting tokens with tiktoken for API models is
`lqae.llm_files.load_tiktoken`, still importable from here.)

Order of cuts when a prompt is too long (METHOD.md, few-shot context budget):
1. drop repeats of the support block, one at a time;
2. shorten every image's token text evenly (the first k tokens of each image, queries included),
   down to `min_image_tokens`;
3. drop shots, one support at a time from the class with the most left, keeping one per class
   (and, for the supports that remain, the longest token text that fits).
A prompt that does not fit even then raises BudgetError; nothing is ever truncated silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from lqae.errors import ConfigError
from lqae.llm_files import load_tiktoken  # noqa: F401 - re-exported (lqae.fewshot.load_tiktoken)


class BudgetError(ConfigError):
    """An episode that cannot fit in the context window even after every allowed cut."""


@dataclass
class Dropped:
    """What was cut from one prompt to fit the context window."""

    repeats: int = 0  # repeats of the support block dropped
    image_tokens: int = 0  # tokens cut from the end of every image's token text
    shots: int = 0  # support images dropped

    def any(self) -> bool:
        return bool(self.repeats or self.image_tokens or self.shots)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Fit:
    """The largest prompt that fits: which supports, how many repeats, how many tokens per image."""

    supports: list[int]  # kept support ids, prompt order
    repeats: int
    image_tokens: int  # tokens kept per image
    prompt_tokens: int  # LLM tokens of the longest prompt plus the reserved answer tokens
    dropped: Dropped = field(default_factory=Dropped)


Measure = Callable[[Sequence[int], int, int], int]  # (supports, repeats, tokens per image) -> LLM tokens


def fit_prompt(
    measure: Measure,
    supports: Sequence[int],
    support_classes: Sequence[str],
    repeats: int,
    image_tokens: int,
    limit: int,
    min_image_tokens: int | None = None,
) -> Fit:
    """The fullest prompt with measure(...) <= limit, cutting in the order of the module docstring.

    supports: support ids in prompt order; support_classes: the class of each.
    """
    supports = list(supports)
    floor = max(1, min(image_tokens, min_image_tokens if min_image_tokens else (image_tokens + 1) // 2))

    for kept_repeats in range(repeats, -1, -1):
        tokens = measure(supports, kept_repeats, image_tokens)
        if tokens <= limit:
            return Fit(supports, kept_repeats, image_tokens, tokens, Dropped(repeats=repeats - kept_repeats))

    length = _longest(lambda k: measure(supports, 0, k), floor, image_tokens - 1, limit)
    if length is not None:
        tokens = measure(supports, 0, length)
        return Fit(supports, 0, length, tokens, Dropped(repeats, image_tokens - length))

    order = shot_drop_order(supports, support_classes)

    def kept(count: int) -> list[int]:
        dropped = set(order[:count])
        return [s for i, s in enumerate(supports) if i not in dropped]

    if not order or measure(kept(len(order)), 0, floor) > limit:
        smallest = measure(kept(len(order)), 0, floor)
        raise BudgetError(
            f"the prompt does not fit in {limit} tokens even with one support per class and {floor} of "
            f"{image_tokens} tokens per image (it needs {smallest}); raise --context-tokens, lower --ways, "
            f"or use a model with a longer context"
        )
    low, high = 1, len(order)  # the smallest number of drops that fits at the floor length
    while low < high:
        middle = (low + high) // 2
        if measure(kept(middle), 0, floor) <= limit:
            high = middle
        else:
            low = middle + 1
    remaining = kept(low)
    length = _longest(lambda k: measure(remaining, 0, k), floor, image_tokens, limit) or floor
    tokens = measure(remaining, 0, length)
    return Fit(remaining, 0, length, tokens, Dropped(repeats, image_tokens - length, low))


def shot_drop_order(supports: Sequence[int], support_classes: Sequence[str]) -> list[int]:
    """Positions of supports to drop, in order: always from the class with the most left (ties: the
    class whose last support comes latest), its last support in prompt order; one per class stays."""
    left = Counter(support_classes)
    positions = {c: [i for i, name in enumerate(support_classes) if name == c] for c in left}
    order = []
    while any(n > 1 for n in left.values()):
        most = max(left.values())
        name = max((c for c in left if left[c] == most), key=lambda c: positions[c][-1])
        order.append(positions[name].pop())
        left[name] -= 1
    return order


def _longest(tokens_at: Callable[[int], int], low: int, high: int, limit: int) -> int | None:
    """Largest k in [low, high] with tokens_at(k) <= limit (tokens grow with k), or None."""
    if high < low or tokens_at(low) > limit:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if tokens_at(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low
