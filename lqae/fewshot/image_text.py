"""Images in prompts: the token text a prompt shows for an image (`PromptImageText`), in one of the
`--image-text` modes."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from lqae.errors import ConfigError
from lqae.fewshot.episodes import token_bag
from lqae.fewshot.settings import IMAGE_TEXTS
from lqae.layout import NO_LAYOUT, TokenLayout
from lqae.tokentext import decode_text


class PromptImageText:
    """Images as the token text a prompt shows: ids decoded as `lqae encode` prints them
    (`lqae.tokentext.decode_text`), cut to the first `length` tokens; memoised, since supports recur
    in every episode and every budget trial.

    mode "sequence": the tokens in order (global words first, then the patches); "frequent": the
    global words, then the image's distinct patch tokens, most frequent first (shorter, and a cut
    drops the rarest); "global": the global words alone. A cut always drops patch tokens before
    global words. `bag` is the multiset the overlap baseline and similar-last ordering compare, a
    global word counting `global_weight` times."""

    def __init__(
        self, tokenizer, mode: str = "sequence", layout: TokenLayout = NO_LAYOUT, global_weight: float = 1.0
    ) -> None:
        """`layout`: the images' token layout (global words first); the default has none."""
        if mode not in IMAGE_TEXTS:
            raise ConfigError(f"unknown image text {mode!r}; choose one of: {', '.join(IMAGE_TEXTS)}")
        if mode == "global" and not layout.global_tokens:
            raise ConfigError("--image-text global shows the global words, but this model has none (global_tokens 0)")
        self.tokenizer, self.mode = tokenizer, mode
        self.layout, self.global_weight = layout, global_weight
        self._cache: dict[tuple[int, ...], str] = {}

    def shown(self, ids: Sequence[int]) -> list[int]:
        """The ids the text shows, in order, before any cut."""
        first, patches = self.layout.split(list(ids))
        if self.mode == "global":
            return first
        return first + (frequent_first(patches) if self.mode == "frequent" else patches)

    def full_length(self, tokens_per_image: int) -> int:
        """Tokens the text shows uncut, for images of `tokens_per_image` ids."""
        return min(self.layout.global_tokens, tokens_per_image) if self.mode == "global" else tokens_per_image

    def bag(self, ids: Sequence[int]) -> Counter:
        return token_bag(self.shown(ids), self.layout, self.global_weight)

    def __call__(self, ids: Sequence[int], length: int | None = None) -> str:
        shown = self.shown(ids)
        key = tuple(shown[:length] if length is not None else shown)
        text = self._cache.get(key)
        if text is None:
            text = self._cache[key] = decode_text(self.tokenizer, key)
        return text


def frequent_first(ids: Sequence[int]) -> list[int]:
    """Distinct ids by count, most frequent first; ties keep their first position."""
    counts = Counter(ids)
    return sorted(counts, key=lambda token: -counts[token])  # Counter keeps first-seen order; sort is stable
