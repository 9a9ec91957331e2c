"""The token layout of an image: its global words first, then its patch words row by row.

Every place that splits an image's ids, tokens or states into those two parts asks this object,
so the order is written down once. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any


@dataclass(frozen=True)
class TokenLayout:
    """`global_tokens` global words, then a `grid` x `grid` grid of patch words (row-major)."""

    global_tokens: int  # 0 for the published method: patch words only
    grid: int  # patches per image side

    @property
    def patches(self) -> int:
        """Patch words per image."""
        return self.grid * self.grid

    @property
    def length(self) -> int:
        """Tokens per image: the LM's sequence length."""
        return self.global_tokens + self.patches

    def split(self, sequence: Any, dim: int = 0) -> tuple[Any, Any]:
        """(global part, patch part) of an image's sequence: a list or tuple of ids or words, or a
        tensor along `dim` (e.g. 1 for (B, L, D) states)."""
        g = self.global_tokens
        if isinstance(sequence, (list, tuple)):
            return sequence[:g], sequence[g:]
        return sequence.narrow(dim, 0, g), sequence.narrow(dim, g, sequence.shape[dim] - g)

    @classmethod
    def of(cls, global_tokens: int, length: int) -> "TokenLayout":
        """The layout of `length`-token sequences whose first `global_tokens` are global words."""
        return cls(global_tokens, math.isqrt(max(0, length - global_tokens)))

    def describe(self) -> str:
        """E.g. "8 global + 4x4 grid" (or "4x4 grid" without global words)."""
        first = f"{self.global_tokens} global + " if self.global_tokens else ""
        return f"{first}{self.grid}x{self.grid} grid"


NO_LAYOUT = TokenLayout(0, 0)  # sequences with no global words (and no grid to speak of)
