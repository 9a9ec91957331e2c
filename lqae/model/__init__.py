"""The model: the ViT encoder and decoder (`vit`), what the decoder reads (`decoder_input`), the frozen
LM (`lm`, its files read by `lm_files`), the language codebook that quantizes onto the LM's word
embeddings (`codebook`, one module per search space), the codebook's vocabulary (`vocab`), the
global words' self-distillation (`distill`), and the LQAE that joins them (`autoencoder`).

Names load lazily, as `lqae`'s: importing `lqae.model.lm_files` does not build the rest.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.model.autoencoder": ("LQAE", "LQAEOutput"),
    "lqae.model.codebook.base": ("LanguageCodebook", "Quantized"),
    "lqae.model.codebook.search": ("nearest_codes",),
    "lqae.model.vocab": ("select_token_ids",),
    "lqae.model.lm": ("FrozenLM", "load_frozen_lm", "load_tokenizer"),
    "lqae.model.vit": ("Decoder", "Encoder"),
    "lqae.model.distill": ("SelfDistillation",),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
