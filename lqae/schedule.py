"""The learning-rate schedule of training and of the probe head: linear warm-up, then half-cosine."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup_fraction: float, peak: float = 1.0, floor: float = 0.0) -> float:
    """The value at `step` of `total`: linear warm-up to `peak` over warmup_fraction of the steps (at
    least one), then half-cosine from `peak` down to `floor` at the last step (MAE, LQAE)."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
