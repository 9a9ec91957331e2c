"""What every search space shares: a frozen codebook made of (a subset of) an LM's input word
embeddings, the nearest-code lookup, the global words' own word sets (LQAE, sec. 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.errors import ConfigError, TokenError
from lqae.layout import TokenLayout
from lqae.model.codebook.search import farthest_points, nearest_codes

SEARCH_CHUNK_TOKENS = 4096  # tokens per nearest-code matmul: bounds memory to this x codebook floats


class Quantized(NamedTuple):
    """The codebook's reading of an encoder output (B, L, D): L = G global + N patch tokens."""

    codes: torch.Tensor  # (B, L) indices into the codebook
    token_ids: torch.Tensor  # (B, L) LM vocabulary ids
    embedded: torch.Tensor  # (B, L, D) the codes' raw LM embeddings (frozen: no gradient)
    coordinates: torch.Tensor  # (B, L, d) the codes' search coordinates, straight-through to the encoder output
    commitment: torch.Tensor  # scalar: mean((sg(e) - z)^2), pulls the encoder output towards its code
    global_scores: torch.Tensor  # (B, G, V_g) each global token's similarity to its words ((B, 0, V_g) without)


class LanguageCodebook(nn.Module):
    """A frozen codebook of LM word embeddings; one subclass per search space (`SEARCH_SPACES`).

    The embeddings are non-persistent buffers: rebuilt from the LM, never saved in checkpoints.
    Whatever the space, a code is a real LM token and the LM reads its raw embedding row.

    A subclass says what a query and a code are in its space: `queries(z)` (..., q) and
    `code_vectors()` (K, q), whose largest dot product with a unit query is the nearest code; and
    the coordinates (..., `dim`) the decoder may read, `query_coordinates` and `code_coordinates`.
    "Codes" are always indices into the codebook.

    With global words (layout.global_tokens G > 0) token g chooses among its own `global_vocab_size`
    words (`global_codes[g]`: disjoint sets spread over the search space, saved with the weights);
    `global_scores` are what the self-distillation loss (`lqae.model.distill`) reads.
    """

    def __init__(
        self, word_embeddings: torch.Tensor, token_ids: list[int], layout: TokenLayout, global_vocab_size: int = 64,
        save_token_ids: bool = False, fit: bool = True, **options,
    ) -> None:
        """`fit=False` leaves what the space fits from the embeddings (a projection, a cell
        assignment, the global word sets) as zeros for a checkpoint's saved values to replace.
        `save_token_ids`: the codes' LM ids are saved with the weights (a vocabulary an LLM's
        tokenizer chose, `lqae.model.vocab`). `options`: the subclass's own (`init_space`)."""
        super().__init__()
        vocab_rows = word_embeddings.shape[0]
        ids = torch.tensor(token_ids, dtype=torch.long)
        embeddings = word_embeddings.detach()[ids].float().clone()
        token_to_code = torch.full((vocab_rows,), -1, dtype=torch.long)
        token_to_code[ids] = torch.arange(len(ids))
        self.register_buffer("embeddings", embeddings, persistent=False)  # (K, D) raw
        self.register_buffer("code_to_token", ids, persistent=save_token_ids)  # (K,)
        self.register_buffer("token_to_code", token_to_code, persistent=False)  # (V,), -1 = not a code
        self.layout = layout
        self.chunk_tokens = SEARCH_CHUNK_TOKENS
        self.init_space(embeddings, fit, **options)
        if layout.global_tokens:
            self.register_buffer("global_codes", self._global_word_sets(global_vocab_size, fit))  # (G, V_g)

    # -- the search space: what a subclass defines ------------------------------------------
    dim: int  # width of the coordinates (`code_coordinates`), set by `init_space`

    @classmethod
    def options(cls, config) -> dict:
        """The ModelConfig fields of this space, as `init_space` takes them."""
        return {}

    def init_space(self, embeddings: torch.Tensor, fit: bool, **options) -> None:
        """Build the space from the (K, D) raw embeddings and set `dim`."""
        raise NotImplementedError

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) encoder output -> (..., q) queries in the search space."""
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        """(K, q) every code in the search space, without gradient."""
        raise NotImplementedError

    def query_coordinates(self, query: torch.Tensor) -> torch.Tensor:
        """(..., q) queries -> (..., dim) their coordinates."""
        return query

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        """(...,) code indices -> (..., dim) their coordinates (what the decoder reads)."""
        return self.code_vectors()[codes]

    def spread_codes(self, count: int) -> torch.Tensor:
        """(count,) code indices spread over the search space: the global words."""
        return farthest_points(self.code_vectors(), count)

    # -- quantizing -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, z: torch.Tensor) -> Quantized:
        """z: (B, L, D) encoder output in LM embedding space, laid out as `self.layout`."""
        query, rows = self.queries(z), self.code_vectors()  # (B, L, q), (K, q)
        global_query, patch_query = self.layout.split(query, 1)
        parts = [self._nearest(global_query[:, i : i + 1], rows[words], words) for i, words in enumerate(self.global_sets)]
        codes = torch.cat(parts + [self._nearest(patch_query, rows)], dim=1)  # (B, L)
        embedded = self.embeddings[codes].to(z.dtype)  # (B, L, D)
        coordinates = self.query_coordinates(query)
        coordinates = coordinates + (self.code_coordinates(codes).to(query.dtype) - coordinates).detach()
        commitment = F.mse_loss(z.float(), embedded.float())  # e is a frozen buffer: the gradient reaches z only
        return Quantized(codes, self.code_to_token[codes], embedded, coordinates, commitment, self._scores(global_query, rows))

    @property
    def global_sets(self) -> torch.Tensor:
        """(G, V_g) each global token's candidate codes ((0, V_g) without global words)."""
        return self.global_codes if self.layout.global_tokens else self.embeddings.new_zeros(0, 1, dtype=torch.long)

    def _nearest(self, query: torch.Tensor, rows: torch.Tensor, subset: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) indices of the nearest of `rows` (K', q) to each query (B, n, q), as codes (`subset`
        maps rows to codes; None: all codes)."""
        with torch.no_grad():
            found = nearest_codes(query.detach().flatten(0, 1), rows, self.chunk_tokens).view(query.shape[:2])
        return subset[found] if subset is not None else found

    def _scores(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Similarity of global queries (B, G, q) to each one's candidate words: (B, G, V_g)."""
        return torch.einsum("bgd,gvd->bgv", query.float(), rows[self.global_sets].float())

    def global_scores(self, z: torch.Tensor) -> torch.Tensor:
        """(B, G, V_g) scores of a global encoder's output (B, G, D) without quantizing it (the second
        view, the teacher)."""
        return self._scores(self.queries(z), self.code_vectors())

    def _global_word_sets(self, words: int, fit: bool) -> torch.Tensor:
        count = self.layout.global_tokens * words
        if count > self.size:
            raise ConfigError(
                f"{self.layout.global_tokens} global tokens x {words} words need {count} codes, but the codebook "
                f"has {self.size}; lower global_vocab_size"
            )
        if not fit:
            return torch.zeros(self.layout.global_tokens, words, dtype=torch.long)
        return self.spread_codes(count).view(words, self.layout.global_tokens).T.contiguous()  # round-robin: each set spread

    def codes_from_token_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map LM ids to code indices; raise TokenError for ids outside the codebook."""
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.token_to_code.numel()):
            raise TokenError(f"token id out of range: the LM vocabulary has {self.token_to_code.numel()} ids")
        codes = self.token_to_code[token_ids]
        if (codes < 0).any():
            bad = sorted(set(token_ids[codes < 0].tolist()))[:5]
            raise TokenError(f"token ids {bad} are not codes of this model's codebook (special or filtered tokens)")
        return codes
