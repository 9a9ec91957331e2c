"""lqae: Language Quantized AutoEncoders in PyTorch.

Heavy modules (torch, transformers) load lazily, so importing `lqae` or `lqae.config` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LQAE": "lqae.model",
    "LQAEOutput": "lqae.model",
    "LanguageCodebook": "lqae.quantizer",
    "nearest_codes": "lqae.quantizer",
    "load_model": "lqae.checkpoint",
    "save_checkpoint": "lqae.checkpoint",
    "train": "lqae.train",
    "ModelConfig": "lqae.config",
    "TrainConfig": "lqae.config",
    "get_preset": "lqae.config",
    "PRESETS": "lqae.config",
    "run_probe": "lqae.probe",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:
    from lqae.checkpoint import load_model, save_checkpoint
    from lqae.config import PRESETS, ModelConfig, TrainConfig, get_preset
    from lqae.model import LQAE, LQAEOutput
    from lqae.quantizer import LanguageCodebook, nearest_codes
    from lqae.train import train


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lqae' has no attribute {name!r}")
