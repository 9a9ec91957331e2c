"""lqae: Language Quantized AutoEncoders in PyTorch.

Heavy modules (torch, transformers) load lazily, so importing `lqae` or `lqae.config` is cheap.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.model": ("LQAE", "LQAEOutput", "LanguageCodebook", "nearest_codes"),
    "lqae.checkpoint": ("load_model", "save_checkpoint"),
    "lqae.training": ("train",),
    "lqae.config": ("ModelConfig", "TrainConfig"),
    "lqae.presets": ("get_preset", "PRESETS"),
    "lqae.probe": ("run_probe",),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
__all__ += ["__version__"]
