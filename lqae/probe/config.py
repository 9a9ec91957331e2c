"""What a probe run is asked to do (`ProbeConfig`) and how it reports progress; light (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lqae.errors import ConfigError

BASELINES = ("pixels", "random-encoder")

# progress(stage, advanced, total): stage is e.g. "features train"; the CLI draws the bars.
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ProbeConfig:
    """How features are chosen and how the head trains (the backbone never trains)."""

    layers: str = "lm"  # lm | encoder | all | comma list like "lm:0,lm:-1,enc:2"
    baselines: tuple[str, ...] = BASELINES  # subset of BASELINES, trained with the same head recipe
    epochs: int = 100  # passes over the cached training features
    batch_size: int = 256  # head minibatch
    lr: float = 3e-3  # AdamW peak lr, linear warm-up then cosine to 0
    weight_decay: float = 1e-4  # on the linear weight only
    warmup_fraction: float = 0.05
    feature_batch_size: int = 64  # images per forward pass during feature extraction
    seed: int = 0  # head init, minibatch order and the random-encoder baseline

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from: {', '.join(BASELINES)} (or none)")
        if self.epochs < 1 or self.batch_size < 1 or self.feature_batch_size < 1:
            raise ConfigError("epochs and batch sizes must be positive")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
