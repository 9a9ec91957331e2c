"""The model: the ViT encoder and decoder (`vit`), the frozen LM (`lm`, its files read by `lm_files`),
the language codebook that quantizes onto the LM's word embeddings (`quantizer`), the global
tokens' self-distillation (`distill`), the LLM-aligned vocabulary filter (`vocab`), and the LQAE
that joins them (`autoencoder`).

Names load lazily, as `lqae`'s: importing `lqae.model.lm_files` does not build the rest.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.model.autoencoder": ("LQAE", "LQAEOutput", "LossBreakdown"),
    "lqae.model.quantizer": (
        "LanguageCodebook", "QuantizerOutput", "build_codebook", "codebook_from_config", "nearest_codes",
        "select_token_ids",
    ),
    "lqae.model.lm": ("FrozenLM", "load_frozen_lm", "load_tokenizer"),
    "lqae.model.vit": ("Decoder", "Encoder"),
    "lqae.model.distill": ("SelfDistillation",),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
