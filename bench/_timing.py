"""Timing helper shared by the bench scripts (run as `python bench/NAME.py`, so this imports as `_timing`)."""

from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
    """Best of `repeats` wall-clock runs of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
