"""Training: the loop (`loop`), the loss in one place (`objective`), the training images and their
sampler (`data`), the run's pieces (`parts`) and its data record (`record`). `train` is the entry
point of `lqae train`."""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.training.loop": ("train", "TrainingInterrupted", "TrainResult"),
    "lqae.training.objective": ("Objective", "LossBreakdown"),
    "lqae.training.parts": ("build_optimizer", "lr_at"),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
