"""The frozen language codebook: nearest LM token embedding by cosine similarity (LQAE, sec. 3)."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
    global_scores: torch.Tensor  # (B, G, V_g) cosine of each global token to its V_g candidate words ((B, 0, 0) without)
    coordinates: torch.Tensor  # (B, L, d) the chosen codes' search-space vectors, straight-through to the queries


class LanguageCodebook(nn.Module):
    """A frozen codebook made of (a subset of) an LM's input word embeddings.

    The embeddings are non-persistent buffers: rebuilt from the LM, never saved in checkpoints.
    Whatever the options, the quantized value is the raw embedding row of a real LM token.

    Options (defaults are the reference's; `lqae.config.CHOICES` lists the values; the encoder's
    "standardize" output lives in `lqae.model.vit.Standardize`):
    - encoder_output "unit": the encoder output is L2-normalised and scaled to the codebook's mean
      row norm before the search, so only its direction is learned and its norm cannot drift.
    - commitment "cosine": 1 - cos(z, e) instead of mean((sg(e) - z)^2).
    - straight_through "rotation": the rotation trick (Fifty et al. 2024, arXiv 2410.06424): the
      quantized value is sg(s R) z with R the rotation taking z's direction to e's and s = |e| / |z|,
      so the gradient reaches z rotated into z's frame instead of copied.
      "soft": forward the nearest code, backward through a softmax over the `soft_top_k` nearest
      codes' cosine similarities (temperature `soft_temperature`): z learns which nearby code would
      lower the loss. In 384 dimensions even the nearest of 20k word embeddings is typically ~78
      degrees from an arbitrary direction, so an identity copy of the gradient says little about
      which code to pick next.
    - search_space "latent": the official release's `quantizer_latent_dim`: two learned linear maps
      (encoder output -> latent, code -> latent), cosine search in that latent space, plus a latent
      commitment and codebook loss. "mapped": SimVQ (Zhu et al. 2024): one learned square map of the
      frozen codebook (identity at start), search against the mapped codes. Latent losses are on unit
      vectors: on raw vectors both maps can shrink to zero and make every code equally near.
      "pca": a fixed search space, the codebook's top `latent_dim` principal directions (centred),
      saved with the weights so the search never depends on a re-computed SVD. 20k codes are dense
      on a 16-d sphere (nearest cosine ~0.8 for a random direction, against ~0.2 in 384-d), so the
      nearest code moves smoothly with the encoder output.
    - global_tokens G > 0: the first G tokens of each sequence are global tokens; token g chooses
      among its own `global_vocab_size` words (`global_codes[g]`: disjoint sets, spread over the
      search space by farthest-point sampling, saved with the weights). `global_scores` are what
      the self-distillation loss (`lqae.model.distill`) reads.
    """

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
        search_space: str = "embedding",
        latent_dim: int = 32,
        soft_top_k: int = 32,
        soft_temperature: float = 0.05,
        global_tokens: int = 0,
        global_vocab_size: int = 64,
        save_token_ids: bool = False,
        fit_search_space: bool = True,
    ) -> None:
        """`fit_search_space=False` leaves the PCA projection as zeros for a checkpoint's saved one to
        replace (fitting it costs a fraction of a second at start-up). `save_token_ids`: the codes'
        LM ids are saved with the weights (a vocabulary an LLM's tokenizer chose, `lqae.vocab`)."""
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
        self.cosine_commitment = commitment == "cosine"
        self.straight_through = straight_through
        self.soft_top_k, self.soft_temperature = soft_top_k, soft_temperature
        self.search_space = search_space
        if search_space == "latent":
            self.input_to_latent = nn.Linear(width, latent_dim)
            self.code_to_latent = nn.Linear(width, latent_dim)
        elif search_space == "mapped":
            self.code_map = nn.Linear(width, width, bias=False)
            nn.init.eye_(self.code_map.weight)
        elif search_space in ("pca", "uniform"):
            if fit_search_space:
                mean = embeddings.mean(0)
                directions = principal_directions(embeddings - mean, latent_dim)  # (d, D)
            else:
                mean, directions = embeddings.new_zeros(width), embeddings.new_zeros(latent_dim, width)
            self.register_buffer("pca_mean", mean)  # (D,) persistent: saved with the checkpoint
            self.register_buffer("pca_directions", directions)  # (d, D)
            if search_space == "uniform":
                scale = ((embeddings - mean) @ directions.T).std(0) if fit_search_space else embeddings.new_ones(latent_dim)
                self.register_buffer("uniform_scale", scale)  # (d,) persistent
            self.register_buffer("pca_codes", self._pca(embeddings), persistent=False)  # (K, d) unit rows
        self.global_tokens = global_tokens
        if global_tokens:
            count = global_tokens * global_vocab_size
            if count > len(ids):
                raise ConfigError(
                    f"{global_tokens} global tokens x {global_vocab_size} words need {count} codes, but the codebook "
                    f"has {len(ids)}; lower global_vocab_size"
                )
            if fit_search_space:
                rows = self.search_vectors(embeddings)[1]
                if search_space == "uniform":  # spread by Euclidean distance in the cube: sim = -|a - b|^2 / 2 + ...
                    rows = self.code_coordinates(torch.arange(len(ids)))
                spread = farthest_points(rows, count, euclidean=search_space == "uniform")  # (count,) code indices
                chosen = spread.view(global_vocab_size, global_tokens).T.contiguous()  # round-robin: each set spread
            else:
                chosen = torch.zeros(global_tokens, global_vocab_size, dtype=torch.long)
            self.register_buffer("global_codes", chosen)  # (G, V_g) persistent: saved with the checkpoint

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        if self.search_space in ("pca", "uniform"):  # the saved projection wins over the one computed at init
            self.pca_codes = self._pca(self.embeddings)
        return result

    def _pca(self, vectors: torch.Tensor) -> torch.Tensor:
        """"pca": unit rows (d) on the sphere of the top principal directions. "uniform": the codes
        as augmented rows [2u, -|u|^2] (d + 1) of their coordinates u in the unit cube, so that the
        dot product with a query's [u_z, 1] is -|u_z - u|^2 up to a constant per query: the largest
        dot product is the nearest code in Euclidean distance, and a softmax over dot products is
        one over negative squared distances."""
        projected = (vectors.float() - self.pca_mean) @ self.pca_directions.T  # (..., d)
        if self.search_space == "pca":
            return F.normalize(projected, dim=-1)
        cube = self._cube(projected)
        return torch.cat([2 * cube, -cube.pow(2).sum(-1, keepdim=True)], dim=-1)

    def _cube(self, projected: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (..., d) -> the unit cube, each through the normal CDF of its
        standardised value: the codebook fills the cube about evenly (as FSQ's grid fills its box)."""
        return 0.5 * (1 + torch.erf(projected / (self.uniform_scale * math.sqrt(2))))

    def _query_coordinates(self, z: torch.Tensor) -> torch.Tensor:
        """"uniform" queries: [u_z, 1] (..., d + 1), u_z in the unit cube."""
        cube = self._cube((z.float() - self.pca_mean) @ self.pca_directions.T)
        return torch.cat([cube, torch.ones_like(cube[..., :1])], dim=-1)

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, z: torch.Tensor, usage: bool = False) -> QuantizerOutput:
        """z: (B, L, D) encoder output in LM embedding space, the G global tokens first; `usage` adds
        the code-usage loss (over the patch tokens)."""
        encoder_norm = z.detach().float().norm(dim=-1).mean()
        z = self._output(z)
        query, search_codes = self.search_vectors(z)  # (B, L, d), (K, d) unit rows
        soft = self.straight_through == "soft" and self.training and torch.is_grad_enabled()
        g = self.global_tokens
        parts = [self._quantize(z[:, g:], query[:, g:], search_codes, None, soft)]  # the patch tokens
        if g:
            parts = [
                self._quantize(z[:, i : i + 1], query[:, i : i + 1], search_codes[words], words, soft)
                for i, words in enumerate(self.global_codes)
            ] + parts
        quantized = torch.cat([part[0] for part in parts], dim=1)  # (B, L, D)
        codes = torch.cat([part[1] for part in parts], dim=1)  # (B, L)
        embedded = self.embeddings[codes].to(z.dtype)  # (B, L, D)
        if self.cosine_commitment:  # gradient reaches z only: e is a constant
            commitment = 1 - F.cosine_similarity(z.float(), embedded.float(), dim=-1).mean()
        else:
            commitment = F.mse_loss(z.float(), embedded.float())
        codebook_loss = z.new_zeros((), dtype=torch.float32)
        if self.search_space in ("latent", "mapped"):
            mapped = self.search_codes(codes)  # (B, L, d) unit rows, with gradient to the map
            commitment = commitment + F.mse_loss(query.float(), mapped.detach().float())
            codebook_loss = F.mse_loss(mapped.float(), query.detach().float())
        usage_loss = self.usage_loss(query[:, g:], search_codes) if usage else z.new_zeros(())
        global_scores = self._global_scores(query[:, :g], search_codes) if g else z.new_zeros(z.shape[0], 0, 0)
        coordinates = self._plain(query)
        coordinates = coordinates + (self.code_coordinates(codes).to(query.dtype) - coordinates).detach()
        return QuantizerOutput(
            quantized, codes, self.code_to_token[codes], commitment, usage_loss, codebook_loss, encoder_norm, global_scores,
            coordinates,
        )

    def _output(self, z: torch.Tensor) -> torch.Tensor:
        """The "unit" encoder output: direction only, at the codebook's mean norm."""
        return F.normalize(z, dim=-1) * self.embedding_scale if self.unit_output else z

    def _quantize(self, z, query, search_codes, subset, soft) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of `search_codes` (K', d) for each of z's (B, n, D) tokens (queries (B, n, d)), with
        the configured straight-through; `subset` maps rows of search_codes to code indices (None: all
        codes). Returns (quantized (B, n, D), code indices (B, n))."""
        k = min(self.soft_top_k, search_codes.shape[0]) if soft else 1
        with torch.no_grad():
            found = nearest_codes(query.detach().flatten(0, 1), search_codes, self.chunk_tokens, k)
        found = found.view(*z.shape[:2], k)  # (B, n, k) rows of search_codes, nearest first
        candidates = subset[found] if subset is not None else found  # (B, n, k) code indices
        codes = candidates[..., 0]
        embedded = self.embeddings[codes].to(z.dtype)  # (B, n, D)
        if self.straight_through == "rotation":
            return rotate_onto(z, embedded), codes
        if k > 1:
            sims = (query.unsqueeze(-2) * search_codes[found]).sum(-1)  # (B, n, k)
            weights = (sims.float() / self.soft_temperature).softmax(dim=-1)
            # value: the nearest code; gradient: that of the softmax mixture sum_j w_j e_j
            mixture = _MixtureGradient.apply(weights, candidates, self.embeddings, self.chunk_tokens)
            return embedded + mixture.to(z.dtype), codes
        return z + (embedded - z).detach(), codes  # straight-through estimator

    def _global_scores(self, query: torch.Tensor, search_codes: torch.Tensor) -> torch.Tensor:
        """Cosine of global queries (B, G, d) to each one's candidate words: (B, G, V_g)."""
        return torch.einsum("bgd,gvd->bgv", query.float(), search_codes[self.global_codes].float())

    def global_scores(self, z: torch.Tensor) -> torch.Tensor:
        """`global_scores` of the global tokens' encoder output (B, G, D), without quantizing (the
        second view, the teacher)."""
        query, search_codes = self.search_vectors(self._output(z))
        return self._global_scores(query, search_codes)

    def search_vectors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (B, N, d), codes (K, d)), both L2-normalised, in the space the search runs in."""
        if self.search_space == "latent":
            return F.normalize(self.input_to_latent(z), dim=-1), self.search_code_matrix()
        if self.search_space == "pca":
            return self._pca(z), self.pca_codes
        if self.search_space == "uniform":
            return self._query_coordinates(z), self.pca_codes
        return F.normalize(z, dim=-1), self.search_code_matrix()

    def _plain(self, query: torch.Tensor) -> torch.Tensor:
        """A query's coordinates in the search space (the augmentation of "uniform" dropped)."""
        return query[..., :-1] if self.search_space == "uniform" else query

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., d) the search-space coordinates of code indices (the cube's for "uniform")."""
        rows = self.search_code_matrix()[codes]
        return rows[..., :-1] / 2 if self.search_space == "uniform" else rows

    def search_code_matrix(self) -> torch.Tensor:
        """(K, d) every code in the search space, L2-normalised, without gradient."""
        if self.search_space == "latent":
            return F.normalize(self.code_to_latent(self.embeddings), dim=-1).detach()
        if self.search_space in ("pca", "uniform"):
            return self.pca_codes
        if self.search_space == "mapped":
            with torch.no_grad():
                return F.normalize(self.code_map(self.embeddings), dim=-1)
        return self.normalized

    def search_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Search-space vectors of the chosen codes, with gradient to the learned map."""
        rows = self.embeddings[codes]
        mapped = self.code_to_latent(rows) if self.search_space == "latent" else self.code_map(rows)
        return F.normalize(mapped, dim=-1)

    def usage_loss(self, query: torch.Tensor, search_codes: torch.Tensor) -> torch.Tensor:
        """Entropy regulariser on soft code assignments (as in MaskGIT/MAGVIT-v2's LFQ): confident per
        token, spread over the codebook per batch. A frozen codebook cannot move towards unused
        encoder outputs, so without it the encoder tends to collapse onto a handful of codes.
        With `usage_top_k`, each token's assignment is a softmax over its nearest `usage_top_k`
        codes only (at the usual temperature the rest carry almost no mass): the same loss without
        a (tokens x codebook) softmax forward and backward."""
        flat = query.flatten(0, 1)
        stride = max(1, flat.shape[0] // self.usage_sample_tokens)
        sample = flat[::stride][: self.usage_sample_tokens].float()  # (S, d) unit rows
        if self.usage_top_k:
            with torch.no_grad():
                nearest = nearest_codes(sample.detach(), search_codes, self.chunk_tokens, self.usage_top_k)  # (S, k)
            scores = (sample.unsqueeze(1) * search_codes[nearest].float()).sum(-1)  # (S, k)
            probs = (scores / self.usage_temperature).softmax(dim=-1)
            mean = torch.zeros(search_codes.shape[0], device=probs.device).index_add(
                0, nearest.flatten(), probs.flatten()
            ) / probs.shape[0]  # (K,)
        else:
            probs = (sample @ search_codes.T / self.usage_temperature).softmax(dim=-1)  # (S, K)
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
