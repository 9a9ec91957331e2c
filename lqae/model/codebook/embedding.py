"""The reference's search space: cosine similarity among the word embeddings themselves."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lqae.model.codebook.base import LanguageCodebook


class EmbeddingCodebook(LanguageCodebook):
    """"embedding": encoder output and embeddings both L2-normalised, nearest by cosine (LQAE's
    exact search); the coordinates are the unit vectors themselves."""

    def init_space(self, embeddings: torch.Tensor, fit: bool) -> None:
        self.register_buffer("normalized", F.normalize(embeddings, dim=-1), persistent=False)  # (K, D)
        self.dim = embeddings.shape[1]

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)

    def code_vectors(self) -> torch.Tensor:
        return self.normalized
