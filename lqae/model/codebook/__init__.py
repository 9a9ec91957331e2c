"""The frozen language codebook: one module per search space (the space the nearest word is looked
up in), each defining a `LanguageCodebook` subclass.

Adding a search space is a file here and a line in `SEARCH_SPACES`. The registry is plain strings,
so `lqae.config` checks `search_space` without importing torch; the class loads when a model is built.
"""

from __future__ import annotations

import importlib

from lqae.errors import ConfigError

SEARCH_SPACES: dict[str, str | type] = {  # config.search_space -> "module:Class" (or the class itself)
    "embedding": "lqae.model.codebook.embedding:EmbeddingCodebook",  # the reference: cosine among the embeddings
    "grid": "lqae.model.codebook.grid:GridCodebook",  # the recipe: FSQ's even grid made of words
}


def codebook_class(search_space: str) -> type:
    """The codebook class registered for `search_space`; unknown names list the known ones."""
    if search_space not in SEARCH_SPACES:
        raise ConfigError(f"unknown search_space {search_space!r}; choose one of: {', '.join(SEARCH_SPACES)}")
    entry = SEARCH_SPACES[search_space]
    if isinstance(entry, type):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)
