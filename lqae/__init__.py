"""lqae: Language Quantized AutoEncoders in PyTorch.

Heavy modules (torch, transformers) load lazily, so importing `lqae` or `lqae.config` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lqae.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {  # submodule -> the public names it provides
    "lqae.model": ("LQAE", "LQAEOutput"),
    "lqae.quantizer": ("LanguageCodebook", "nearest_codes"),
    "lqae.checkpoint": ("load_model", "save_checkpoint"),
    "lqae.train": ("train",),
    "lqae.config": ("ModelConfig", "TrainConfig", "get_preset", "PRESETS"),
    "lqae.probe": ("run_probe",),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
__all__ += ["__version__"]

if TYPE_CHECKING:
    from lqae.checkpoint import load_model, save_checkpoint
    from lqae.config import PRESETS, ModelConfig, TrainConfig, get_preset
    from lqae.model import LQAE, LQAEOutput
    from lqae.quantizer import LanguageCodebook, nearest_codes
    from lqae.train import train
