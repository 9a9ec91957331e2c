"""The frozen language codebook: nearest LM token embedding by cosine similarity (LQAE, sec. 3)."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.config import ModelConfig
from lqae.errors import ConfigError, TokenError

_SPECIAL_PATTERN = re.compile(r"^(\[[^\]]*\]|<[^>]*>|madeupword\d+)$")


def select_token_ids(tokenizer, vocab_rows: int, vocab: str = "all", exclude_special: bool = True) -> list[int]:
    """LM token ids that may serve as codes.

    vocab="all": every id with a token string (minus special tokens when exclude_special);
    vocab="words": whole alphabetic words only, no subword continuations, digits or punctuation,
    so token text reads as words and costs fewer tokens for a downstream LLM.
    """
    size = min(vocab_rows, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids) if exclude_special else set()
    marker = _word_marker(tokens)
    chosen = []
    for token_id, token in enumerate(tokens):
        if token is None or token_id in special:
            continue
        if exclude_special and _SPECIAL_PATTERN.match(token):
            continue
        if vocab == "words" and not _is_whole_word(token, marker):
            continue
        chosen.append(token_id)
    return chosen


def _word_marker(tokens: list[str | None]) -> str | None:
    """The prefix marking a word start in BPE/SentencePiece vocabularies (None for WordPiece)."""
    sample = [t for t in tokens[:5000] if t]
    for marker in ("Ġ", "▁"):
        if sum(t.startswith(marker) for t in sample) > len(sample) // 10:
            return marker
    return None


def _is_whole_word(token: str, marker: str | None) -> bool:
    if marker is None:
        word = token
    elif token.startswith(marker):
        word = token[len(marker):]
    else:
        return False
    return word.isascii() and word.isalpha()


def nearest_codes(
    vectors: torch.Tensor, normalized_codebook: torch.Tensor, chunk_tokens: int = 4096, k: int = 1
) -> torch.Tensor:
    """Exact cosine nearest neighbour: (N, D) x (K, D) unit rows -> (N,) code indices, or with k > 1
    the (N, k) nearest, nearest first.

    Chunked over tokens so memory stays at chunk_tokens x K scores whatever N is.
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):  # exact fp32 search under bf16 training
        return _nearest_codes_fp32(vectors, normalized_codebook, chunk_tokens, k)


def _nearest_codes_fp32(vectors: torch.Tensor, normalized_codebook: torch.Tensor, chunk_tokens: int, k: int) -> torch.Tensor:
    queries = F.normalize(vectors.float(), dim=-1)
    total = queries.shape[0]
    codes = torch.empty(total, k, dtype=torch.long, device=queries.device)
    # One score buffer reused by every chunk: no fresh multi-hundred-MB allocation per chunk.
    scores = torch.empty(min(chunk_tokens, total), normalized_codebook.shape[0], device=queries.device)
    for start in range(0, total, chunk_tokens):
        chunk = queries[start : start + chunk_tokens]
        torch.mm(chunk, normalized_codebook.T, out=scores[: chunk.shape[0]])  # (n, K)
        block = scores[: chunk.shape[0]]
        codes[start : start + chunk.shape[0]] = block.argmax(dim=-1, keepdim=True) if k == 1 else block.topk(k, dim=-1).indices
    return codes[:, 0] if k == 1 else codes


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, L, D) raw LM embeddings, straight-through to the encoder
    codes: torch.Tensor  # (B, L) indices into the codebook
    token_ids: torch.Tensor  # (B, L) LM vocabulary ids
    commitment_loss: torch.Tensor  # scalar, unweighted: pulls the encoder output towards its code
    usage_loss: torch.Tensor  # scalar: mean per-token code entropy minus entropy of the mean (0 when off)
    codebook_loss: torch.Tensor  # scalar: pulls the learned search map's code towards the encoder output (0 without one)
    encoder_norm: torch.Tensor  # scalar: mean L2 norm of the raw encoder output (shows norm drift)
    global_scores: torch.Tensor  # (B, G, V_g) similarity of each global token to its V_g candidate words ((B, 0, 0) without)
    coordinates: torch.Tensor  # (B, L, d) the chosen codes' search-space vectors, straight-through to the queries


def mse_commitment(z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """mean((sg(e) - z)^2) (the reference's): e is a frozen buffer, so the gradient reaches z only."""
    return F.mse_loss(z.float(), embedded.float())


def cosine_commitment(z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
    """1 - cos(z, e): the angle the search uses, whatever z's norm; the gradient reaches z only."""
    return 1 - F.cosine_similarity(z.float(), embedded.float(), dim=-1).mean()


COMMITMENTS = {"mse": mse_commitment, "cosine": cosine_commitment}  # config.commitment -> (z, e) -> scalar


class LanguageCodebook(nn.Module):
    """A frozen codebook made of (a subset of) an LM's input word embeddings; one subclass per search
    space (the space the nearest code is looked up in), chosen by `build_codebook`.

    The embeddings are non-persistent buffers: rebuilt from the LM, never saved in checkpoints.
    Whatever the options, the quantized value is the raw embedding row of a real LM token.

    Options (defaults are the reference's; `lqae.config.CHOICES` lists the values):
    - encoder_output "unit": the encoder output is L2-normalised and scaled to the codebook's mean
      row norm before the search, so only its direction is learned and its norm cannot drift.
      (The "standardize" output is the encoder's own last step, `lqae.model.vit.Standardize`: its
      running statistics are encoder weights.)
    - commitment: `COMMITMENTS`.
    - straight_through "rotation": the rotation trick (Fifty et al. 2024, arXiv 2410.06424): the
      quantized value is sg(s R) z with R the rotation taking z's direction to e's and s = |e| / |z|,
      so the gradient reaches z rotated into z's frame instead of copied.
      "soft": forward the nearest code, backward through a softmax over the `soft_top_k` nearest
      codes' cosine similarities (temperature `soft_temperature`): z learns which nearby code would
      lower the loss. In 384 dimensions even the nearest of 20k word embeddings is typically ~78
      degrees from an arbitrary direction, so an identity copy of the gradient says little about
      which code to pick next.
      "none": no gradient through the quantized value at all; with `decoder_input` "lm_search" the
      encoder still learns through the code coordinates the decoder reads (straight-through there, as
      FSQ's), and the LM only reads the words.
    - global_tokens G > 0: the first G tokens of each sequence are global tokens; token g chooses
      among its own `global_vocab_size` words (`global_codes[g]`: disjoint sets, spread over the
      search space by farthest-point sampling, saved with the weights). `global_scores` are what
      the self-distillation loss (`lqae.model.distill`) reads.

    A subclass says what a query and a code are in its space (`queries`, `code_vectors`, both
    (..., d)); "code vectors" are rows of that space, "codes" are always indices into the codebook.
    """

    search_space = ""  # config.search_space of the subclass

    def __init__(
        self,
        word_embeddings: torch.Tensor,
        token_ids: list[int],
        chunk_tokens: int = 4096,
        usage_temperature: float = 0.01,
        usage_sample_tokens: int = 1024,
        usage_top_k: int = 0,
        encoder_output: str = "linear",
        commitment: str = "mse",
        straight_through: str = "identity",
        latent_dim: int = 32,
        soft_top_k: int = 32,
        soft_temperature: float = 0.05,
        global_tokens: int = 0,
        global_vocab_size: int = 64,
        save_token_ids: bool = False,
        fit_search_space: bool = True,
    ) -> None:
        """`fit_search_space=False` leaves a fitted search space (the PCA projection) as zeros for a
        checkpoint's saved one to replace (fitting it costs a fraction of a second at start-up).
        `save_token_ids`: the codes' LM ids are saved with the weights (a vocabulary an LLM's
        tokenizer chose, `lqae.model.vocab`)."""
        super().__init__()
        vocab_rows, width = word_embeddings.shape
        ids = torch.tensor(token_ids, dtype=torch.long)
        embeddings = word_embeddings.detach()[ids].float().clone()
        token_to_code = torch.full((vocab_rows,), -1, dtype=torch.long)
        token_to_code[ids] = torch.arange(len(ids))
        self.register_buffer("embeddings", embeddings, persistent=False)  # (K, D) raw
        self.register_buffer("normalized", F.normalize(embeddings, dim=-1), persistent=False)  # (K, D)
        self.register_buffer("code_to_token", ids, persistent=save_token_ids)  # (K,)
        self.register_buffer("token_to_code", token_to_code, persistent=False)  # (V,), -1 = not a code
        self.chunk_tokens = chunk_tokens
        self.usage_temperature, self.usage_sample_tokens = usage_temperature, usage_sample_tokens
        self.usage_top_k = min(usage_top_k, len(ids))
        self.unit_output = encoder_output == "unit"
        self.embedding_scale = float(embeddings.norm(dim=-1).mean())  # typical |e|: the unit output's length
        self.commitment = COMMITMENTS[commitment]
        self.straight_through = straight_through
        self.soft_top_k, self.soft_temperature = soft_top_k, soft_temperature
        self._init_search_space(embeddings, latent_dim, fit_search_space)
        self.global_tokens = global_tokens
        if global_tokens:
            count = global_tokens * global_vocab_size
            if count > len(ids):
                raise ConfigError(
                    f"{global_tokens} global tokens x {global_vocab_size} words need {count} codes, but the codebook "
                    f"has {len(ids)}; lower global_vocab_size"
                )
            if fit_search_space:
                spread = self._spread_codes(count)  # (count,) code indices
                chosen = spread.view(global_vocab_size, global_tokens).T.contiguous()  # round-robin: each set spread
            else:
                chosen = torch.zeros(global_tokens, global_vocab_size, dtype=torch.long)
            self.register_buffer("global_codes", chosen)  # (G, V_g) persistent: saved with the checkpoint

    # -- the search space: what a subclass defines ------------------------------------------
    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        """Build the space's maps or fitted projection (embeddings: (K, D) raw)."""

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) encoder output -> (..., d) queries in the search space."""
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        """(K, d) every code in the search space, without gradient; the largest dot product with a
        query is its nearest code."""
        raise NotImplementedError

    def query_coordinates(self, query: torch.Tensor) -> torch.Tensor:
        """A query's coordinates in the search space (what the decoder's "search" input reads)."""
        return query

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) the search-space coordinates of code indices."""
        return self.code_vectors()[codes]

    def map_losses(self, query: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A learned search map's (commitment, codebook) losses in the search space; None without one."""
        return None

    def _spread_codes(self, count: int) -> torch.Tensor:
        """(count,) code indices spread over the search space: the global tokens' words."""
        return farthest_points(self.code_vectors(), count)

    # -- quantizing -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def search_vectors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (B, N, d), code vectors (K, d)): the two sides of the search."""
        return self.queries(z), self.code_vectors()

    def forward(self, z: torch.Tensor, usage: bool = False) -> QuantizerOutput:
        """z: (B, L, D) encoder output in LM embedding space, the G global tokens first; `usage` adds
        the code-usage loss (over the patch tokens)."""
        encoder_norm = z.detach().float().norm(dim=-1).mean()
        z = self._encoder_output(z)
        query, code_vectors = self.search_vectors(z)  # (B, L, d), (K, d)
        soft = self.straight_through == "soft" and self.training and torch.is_grad_enabled()
        g = self.global_tokens
        parts = [self._quantize(z[:, g:], query[:, g:], code_vectors, None, soft)]  # the patch tokens
        if g:
            parts = [
                self._quantize(z[:, i : i + 1], query[:, i : i + 1], code_vectors[words], words, soft)
                for i, words in enumerate(self.global_codes)
            ] + parts
        quantized = torch.cat([part[0] for part in parts], dim=1)  # (B, L, D)
        codes = torch.cat([part[1] for part in parts], dim=1)  # (B, L)
        commitment = self.commitment(z, self.embeddings[codes].to(z.dtype))
        codebook_loss = z.new_zeros((), dtype=torch.float32)
        map_losses = self.map_losses(query, codes)
        if map_losses is not None:
            commitment, codebook_loss = commitment + map_losses[0], map_losses[1]
        usage_loss = self.usage_loss(query[:, g:], code_vectors) if usage else z.new_zeros(())
        global_scores = self._global_scores(query[:, :g], code_vectors) if g else z.new_zeros(z.shape[0], 0, 0)
        coordinates = self.query_coordinates(query)
        coordinates = coordinates + (self.code_coordinates(codes).to(query.dtype) - coordinates).detach()
        return QuantizerOutput(
            quantized, codes, self.code_to_token[codes], commitment, usage_loss, codebook_loss, encoder_norm, global_scores,
            coordinates,
        )

    def _encoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The "unit" encoder output: direction only, at the codebook's mean norm."""
        return F.normalize(z, dim=-1) * self.embedding_scale if self.unit_output else z

    def _quantize(self, z, query, code_vectors, subset, soft) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of `code_vectors` (K', d) for each of z's (B, n, D) tokens (queries (B, n, d)), with
        the configured straight-through; `subset` maps rows of code_vectors to code indices (None: all
        codes). Returns (quantized (B, n, D), code indices (B, n))."""
        k = min(self.soft_top_k, code_vectors.shape[0]) if soft else 1
        with torch.no_grad():
            found = nearest_codes(query.detach().flatten(0, 1), code_vectors, self.chunk_tokens, k)
        found = found.view(*z.shape[:2], k)  # (B, n, k) rows of code_vectors, nearest first
        candidates = subset[found] if subset is not None else found  # (B, n, k) code indices
        codes = candidates[..., 0]
        embedded = self.embeddings[codes].to(z.dtype)  # (B, n, D)
        if self.straight_through == "rotation":
            return rotate_onto(z, embedded), codes
        if self.straight_through == "none":
            return embedded, codes
        if k > 1:
            sims = (query.unsqueeze(-2) * code_vectors[found]).sum(-1)  # (B, n, k)
            weights = (sims.float() / self.soft_temperature).softmax(dim=-1)
            # value: the nearest code; gradient: that of the softmax mixture sum_j w_j e_j
            mixture = _MixtureGradient.apply(weights, candidates, self.embeddings, self.chunk_tokens)
            return embedded + mixture.to(z.dtype), codes
        return z + (embedded - z).detach(), codes  # straight-through estimator

    def _global_scores(self, query: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
        """Similarity of global queries (B, G, d) to each one's candidate words: (B, G, V_g)."""
        return torch.einsum("bgd,gvd->bgv", query.float(), code_vectors[self.global_codes].float())

    def global_scores(self, z: torch.Tensor) -> torch.Tensor:
        """`global_scores` of the global tokens' encoder output (B, G, D), without quantizing (the
        second view, the teacher)."""
        query, code_vectors = self.search_vectors(self._encoder_output(z))
        return self._global_scores(query, code_vectors)

    def usage_loss(self, query: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
        """Entropy regulariser on soft code assignments (as in MaskGIT/MAGVIT-v2's LFQ): confident per
        token, spread over the codebook per batch. A frozen codebook cannot move towards unused
        encoder outputs, so without it the encoder tends to collapse onto a handful of codes.
        With `usage_top_k`, each token's assignment is a softmax over its nearest `usage_top_k`
        codes only (at the usual temperature the rest carry almost no mass): the same loss without
        a (tokens x codebook) softmax forward and backward."""
        flat = query.flatten(0, 1)
        stride = max(1, flat.shape[0] // self.usage_sample_tokens)
        sample = flat[::stride][: self.usage_sample_tokens].float()  # (S, d)
        if self.usage_top_k:
            with torch.no_grad():
                nearest = nearest_codes(sample.detach(), code_vectors, self.chunk_tokens, self.usage_top_k)  # (S, k)
            scores = (sample.unsqueeze(1) * code_vectors[nearest].float()).sum(-1)  # (S, k)
            probs = (scores / self.usage_temperature).softmax(dim=-1)
            mean = torch.zeros(code_vectors.shape[0], device=probs.device).index_add(
                0, nearest.flatten(), probs.flatten()
            ) / probs.shape[0]  # (K,)
        else:
            probs = (sample @ code_vectors.T / self.usage_temperature).softmax(dim=-1)  # (S, K)
            mean = probs.mean(0)
        per_token = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return per_token + (mean * mean.clamp_min(1e-12).log()).sum()

    def codes_from_token_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map LM ids to code indices; raise TokenError for ids outside the codebook."""
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.token_to_code.numel()):
            raise TokenError(f"token id out of range: the LM vocabulary has {self.token_to_code.numel()} ids")
        codes = self.token_to_code[token_ids]
        if (codes < 0).any():
            bad = sorted(set(token_ids[codes < 0].tolist()))[:5]
            raise TokenError(f"token ids {bad} are not codes of this model's codebook (special or filtered tokens)")
        return codes


class EmbeddingCodebook(LanguageCodebook):
    """"embedding" (the reference): cosine search among the word embeddings themselves."""

    search_space = "embedding"

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)

    def code_vectors(self) -> torch.Tensor:
        return self.normalized


class _LearnedMapCodebook(LanguageCodebook):
    """A search space learned with the model: a latent commitment pulls the query towards its code's
    mapped vector and a codebook loss the map towards the query. Both on unit vectors: on raw vectors
    the maps can shrink to zero and make every code equally near."""

    def _map_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D) code embeddings -> (..., d), with gradient to the map."""
        raise NotImplementedError

    def mapped_code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) the chosen codes' unit vectors in the search space, with gradient to the map."""
        return F.normalize(self._map_codes(self.embeddings[codes]), dim=-1)

    def map_losses(self, query: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mapped = self.mapped_code_vectors(codes)  # (B, L, d)
        return F.mse_loss(query.float(), mapped.detach().float()), F.mse_loss(mapped.float(), query.detach().float())


class LatentCodebook(_LearnedMapCodebook):
    """"latent": the official release's `quantizer_latent_dim`: two learned linear maps (encoder
    output -> latent, code -> latent) and cosine search in that `latent_dim` space."""

    search_space = "latent"

    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        width = embeddings.shape[1]
        self.input_to_latent = nn.Linear(width, latent_dim)
        self.code_to_latent = nn.Linear(width, latent_dim)

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.input_to_latent(z), dim=-1)

    def code_vectors(self) -> torch.Tensor:
        return F.normalize(self.code_to_latent(self.embeddings), dim=-1).detach()

    def _map_codes(self, rows: torch.Tensor) -> torch.Tensor:
        return self.code_to_latent(rows)


class MappedCodebook(_LearnedMapCodebook):
    """"mapped": SimVQ (Zhu et al. 2024, arXiv 2411.02038): one learned square map of the frozen
    codebook (the identity at start), cosine search against the mapped codes."""

    search_space = "mapped"

    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        width = embeddings.shape[1]
        self.code_map = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.code_map.weight)

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)

    def code_vectors(self) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.code_map(self.embeddings), dim=-1)

    def _map_codes(self, rows: torch.Tensor) -> torch.Tensor:
        return self.code_map(rows)


class PCACodebook(LanguageCodebook):
    """"pca": a fixed search space, the codebook's top `latent_dim` principal directions (centred),
    cosine search there. The projection is saved with the weights, so the search never depends on a
    re-computed decomposition. 20k codes are dense on a 16-d sphere (nearest cosine ~0.8 for a random
    direction, against ~0.2 in 384-d), so the nearest code moves smoothly with the encoder output."""

    search_space = "pca"

    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        self._init_projection(embeddings, latent_dim, fit)
        self.register_buffer("pca_codes", self._code_rows(embeddings), persistent=False)  # (K, d)

    def _init_projection(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        if fit:
            mean = embeddings.mean(0)
            directions = principal_directions(embeddings - mean, latent_dim)  # (d, D)
        else:
            mean, directions = embeddings.new_zeros(embeddings.shape[1]), embeddings.new_zeros(latent_dim, embeddings.shape[1])
        self.register_buffer("pca_mean", mean)  # (D,) persistent: saved with the checkpoint
        self.register_buffer("pca_directions", directions)  # (d, D)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.pca_codes = self._code_rows(self.embeddings)  # from the saved projection, not the one fitted at init
        return result

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., d) principal coordinates."""
        return (vectors.float() - self.pca_mean) @ self.pca_directions.T

    def _code_rows(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., d) unit rows on the sphere of the top principal directions (queries and codes alike)."""
        return F.normalize(self._project(vectors), dim=-1)

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return self._code_rows(z)

    def code_vectors(self) -> torch.Tensor:
        return self.pca_codes


class UniformCodebook(PCACodebook):
    """"uniform": the principal coordinates through the normal CDF into the unit cube, nearest by
    Euclidean distance there. The codes are the augmented rows [2u, -|u|^2] (d + 1) of their cube
    coordinates u and a query is [u_z, 1], so the dot product is -|u_z - u|^2 up to a constant per
    query: the largest dot product is the nearest code, and a softmax over dot products is one over
    negative squared distances."""

    search_space = "uniform"

    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        self._init_projection(embeddings, latent_dim, fit)
        scale = self._project(embeddings).std(0) if fit else embeddings.new_ones(latent_dim)
        self.register_buffer("uniform_scale", scale)  # (d,) persistent
        self.register_buffer("pca_codes", self._code_rows(embeddings), persistent=False)  # (K, d + 1)

    def _cube(self, projected: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (..., d) -> the unit cube, each through the normal CDF of its
        standardised value: the codebook fills the cube about evenly (as FSQ's grid fills its box)."""
        return 0.5 * (1 + torch.erf(projected / (self.uniform_scale * math.sqrt(2))))

    def _code_rows(self, vectors: torch.Tensor) -> torch.Tensor:
        cube = self._cube(self._project(vectors))
        return torch.cat([2 * cube, -cube.pow(2).sum(-1, keepdim=True)], dim=-1)

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        cube = self._cube(self._project(z))
        return torch.cat([cube, torch.ones_like(cube[..., :1])], dim=-1)

    def query_coordinates(self, query: torch.Tensor) -> torch.Tensor:
        return query[..., :-1]  # the augmentation dropped

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        return self.pca_codes[codes][..., :-1] / 2

    def _spread_codes(self, count: int) -> torch.Tensor:
        # by Euclidean distance in the cube: similarity -|a - b|^2
        return farthest_points(self.code_coordinates(torch.arange(self.size)), count, euclidean=True)


class GridCodebook(UniformCodebook):
    """"grid": FSQ's evenly filled grid (Mentzer et al. 2023, arXiv 2309.15505) made of words. The
    unit cube of "uniform" is cut into `grid_levels(K, latent_dim)` cells per side, each cell gets
    one word (`grid_assignment`: a balanced split along each principal coordinate in turn, so a
    cell's word sits near it), and a query picks the cell it falls in; the decoder reads the cell's
    centre. The few words left without a cell are never chosen when encoding (decoding them reads
    their own cube coordinates). The assignment is saved with the weights."""

    search_space = "grid"
    _UNASSIGNED = -1e6  # the augmented row's last entry of a word without a cell: never nearest

    def _init_search_space(self, embeddings: torch.Tensor, latent_dim: int, fit: bool) -> None:
        self._init_projection(embeddings, latent_dim, fit)
        size = embeddings.shape[0]
        if fit:
            self.register_buffer("uniform_scale", self._project(embeddings).std(0))
            cells = grid_assignment(self._cube(self._project(embeddings)), grid_levels(size, latent_dim))
        else:
            self.register_buffer("uniform_scale", embeddings.new_ones(latent_dim))
            cells = torch.full((size,), -1, dtype=torch.long)
        self.register_buffer("grid_cells", cells)  # (K,) persistent: each code's flat cell index, -1 = none
        self._build_rows(embeddings)

    def _build_rows(self, embeddings: torch.Tensor) -> None:
        levels = torch.tensor(grid_levels(embeddings.shape[0], self.pca_directions.shape[0]))
        cube = self._cube(self._project(embeddings))  # (K, d)
        assigned = self.grid_cells >= 0
        centres = cell_centres(self.grid_cells.clamp_min(0), levels)
        coordinates = torch.where(assigned.unsqueeze(-1), centres, cube)
        rows = torch.cat([2 * coordinates, -coordinates.pow(2).sum(-1, keepdim=True)], dim=-1)
        rows[~assigned, -1] = self._UNASSIGNED
        self.register_buffer("grid_coordinates", coordinates, persistent=False)  # (K, d)
        self.register_buffer("pca_codes", rows, persistent=False)  # (K, d + 1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = nn.Module.load_state_dict(self, state_dict, strict, assign)
        self._build_rows(self.embeddings)  # from the saved projection and assignment
        return result

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        return self.grid_coordinates[codes]

    def _spread_codes(self, count: int) -> torch.Tensor:
        assigned = torch.nonzero(self.grid_cells >= 0).squeeze(1)
        return assigned[farthest_points(self.grid_coordinates[assigned], count, euclidean=True)]


def grid_levels(count: int, dim: int) -> list[int]:
    """Cells per side of a `dim`-d grid of at most `count` cells, as even as possible (the first
    sides one larger where that still fits): 21,745 words in 6-d -> 6,5,5,5,5,5 = 18,750 cells."""
    if count < 2**dim:
        raise ConfigError(f"a {dim}-d grid needs at least {2**dim} codes, the codebook has {count}; lower latent_dim")
    side = int(count ** (1 / dim))
    while (side + 1) ** dim <= count:  # float rounding of the root
        side += 1
    levels = [side] * dim
    for i in range(dim):
        if math.prod(levels) // side * (side + 1) <= count:
            levels[i] += 1
    return levels


def cell_centres(cells: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(...,) flat cell indices (first side most significant) -> (..., d) centres in the unit cube."""
    strides = torch.cumprod(torch.cat([levels.new_ones(1), levels[1:].flip(0)]), 0).flip(0)  # (d,)
    digits = (cells.unsqueeze(-1) // strides) % levels
    return (digits.float() + 0.5) / levels.float()


def grid_assignment(cube: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """One word per cell of the grid: (K, d) cube coordinates -> (K,) flat cell index or -1.

    Sort all words along the first coordinate and cut them into levels[0] equal groups, cut each
    group along the second coordinate into levels[1], and so on: every cell then holds at least one
    word (K >= cells), and of a cell's words the one nearest its centre takes it. Deterministic."""
    count, dim = cube.shape
    group = torch.zeros(count, dtype=torch.long)
    for axis, side in enumerate(levels):
        order = torch.argsort(cube[:, axis], stable=True)
        order = order[torch.argsort(group[order], stable=True)]  # by group, then by this coordinate
        sizes = torch.bincount(group, minlength=int(group.max()) + 1)
        starts = torch.cumsum(sizes, 0) - sizes
        sorted_group = group[order]
        rank = torch.arange(count) - starts[sorted_group]
        chunk = rank * side // sizes[sorted_group]
        group[order] = sorted_group * side + chunk
    centres = cell_centres(group, torch.tensor(levels))
    distance = (cube.float() - centres).pow(2).sum(-1)
    order = torch.argsort(distance, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by cell, nearest first
    first = torch.ones(count, dtype=torch.bool)
    first[1:] = group[order][1:] != group[order][:-1]
    cells = torch.full((count,), -1, dtype=torch.long)
    cells[order[first]] = group[order[first]]
    return cells


CODEBOOKS = {
    cls.search_space: cls
    for cls in (EmbeddingCodebook, LatentCodebook, MappedCodebook, PCACodebook, UniformCodebook, GridCodebook)
}


def build_codebook(
    word_embeddings: torch.Tensor, token_ids: list[int], search_space: str = "embedding", **options
) -> LanguageCodebook:
    """The codebook searching `search_space` (`CODEBOOKS`); `options` as `LanguageCodebook`'s."""
    if search_space not in CODEBOOKS:
        raise ConfigError(f"unknown search_space {search_space!r}; choose one of: {', '.join(CODEBOOKS)}")
    return CODEBOOKS[search_space](word_embeddings, token_ids, **options)


def codebook_from_config(
    config: ModelConfig, word_embeddings: torch.Tensor, token_ids: list[int], fit_search_space: bool = True
) -> LanguageCodebook:
    """The codebook a model config asks for, over `token_ids` of the LM's (V, D) `word_embeddings`."""
    return build_codebook(
        word_embeddings, token_ids, config.search_space, chunk_tokens=config.search_chunk_tokens,
        usage_temperature=config.usage_temperature, usage_sample_tokens=config.usage_sample_tokens,
        usage_top_k=config.usage_top_k, encoder_output=config.encoder_output, commitment=config.commitment,
        straight_through=config.straight_through, latent_dim=config.latent_dim, soft_top_k=config.soft_top_k,
        soft_temperature=config.soft_temperature, global_tokens=config.global_tokens,
        global_vocab_size=config.global_vocab_size, save_token_ids=config.llm_vocab is not None,
        fit_search_space=fit_search_space,
    )


def rotate_onto(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): returns `target` in the forward pass, computed as
    sg(s R) z where R rotates z's direction onto target's and s = |target| / |z| (both constants), so
    the gradient reaches z through the same rotation. z, target: (..., D)."""
    with torch.no_grad():
        u = F.normalize(z.float(), dim=-1)
        v = F.normalize(target.float(), dim=-1)
        r = F.normalize(u + v, dim=-1)  # the bisector; R = I - 2 r r^T + 2 v u^T
        scale = target.float().norm(dim=-1, keepdim=True) / z.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    zf = z.float()
    rotated = zf - 2 * r * (zf * r).sum(-1, keepdim=True) + 2 * v * (zf * u).sum(-1, keepdim=True)
    out = (scale * rotated).to(z.dtype)
    return out + (target - out).detach()  # exact forward value despite float rounding


def farthest_points(rows: torch.Tensor, count: int, euclidean: bool = False) -> torch.Tensor:
    """`count` row indices of (K, d) rows spread by farthest-point sampling: start at the row
    nearest the mean, then repeatedly take the row least similar to all taken so far (similarity:
    cosine of unit rows, or negative squared distance). Deterministic. Returns (count,) long."""
    rows = rows.float()

    def similarity(row: torch.Tensor) -> torch.Tensor:
        return -(rows - row).pow(2).sum(-1) if euclidean else rows @ row

    chosen = torch.empty(count, dtype=torch.long)
    centre = rows.mean(0) if euclidean else F.normalize(rows.mean(0), dim=0)
    chosen[0] = int(similarity(centre).argmax())
    nearest = similarity(rows[chosen[0]])  # (K,) similarity to the nearest chosen row
    for i in range(1, count):
        chosen[i] = int(nearest.argmin())
        nearest = torch.maximum(nearest, similarity(rows[chosen[i]]))
    return chosen


def principal_directions(centred: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) top principal directions of centred (K, D) rows, signs fixed (largest entry positive).
    From the eigenvectors of the (D, D) scatter matrix in float64: the SVD's directions, 3x faster."""
    centred = centred.double()
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    directions = vectors[:, -count:].flip(1).T
    signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return (directions * signs).float()


class _MixtureGradient(torch.autograd.Function):
    """Zero in the forward pass; in the backward pass, the gradient of the mixture
    sum_j weights[..., j] * embeddings[candidates[..., j]] with respect to the weights.

    Equal to `mix - mix.detach()` without keeping the (B, N, k, D) gathered candidates alive from
    the forward to the backward pass; the backward gathers them a chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, weights, candidates, embeddings, chunk_tokens):
        ctx.save_for_backward(candidates)
        ctx.embeddings, ctx.chunk_tokens = embeddings, chunk_tokens
        return weights.new_zeros(*weights.shape[:-1], embeddings.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (candidates,) = ctx.saved_tensors
        flat_candidates, flat_grad = candidates.flatten(0, -2), grad.flatten(0, -2).float()
        out = torch.empty(flat_candidates.shape, device=grad.device)  # (T, k)
        for start in range(0, flat_candidates.shape[0], ctx.chunk_tokens):
            stop = start + ctx.chunk_tokens
            rows = ctx.embeddings[flat_candidates[start:stop]]  # (n, k, D)
            out[start:stop] = torch.einsum("nkd,nd->nk", rows, flat_grad[start:stop])
        return out.view(candidates.shape), None, None, None
