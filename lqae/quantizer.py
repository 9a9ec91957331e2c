"""The frozen language codebook: nearest LM token embedding by cosine similarity (LQAE, sec. 3)."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.errors import TokenError

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


def nearest_codes(vectors: torch.Tensor, normalized_codebook: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Exact cosine nearest neighbour: (N, D) x (K, D) unit rows -> (N,) code indices.

    Chunked over tokens so memory stays at chunk_tokens x K scores whatever N is.
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):  # exact fp32 search under bf16 training
        return _nearest_codes_fp32(vectors, normalized_codebook, chunk_tokens)


def _nearest_codes_fp32(vectors: torch.Tensor, normalized_codebook: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    queries = F.normalize(vectors.float(), dim=-1)
    total = queries.shape[0]
    codes = torch.empty(total, dtype=torch.long, device=queries.device)
    # One score buffer reused by every chunk: no fresh multi-hundred-MB allocation per chunk.
    scores = torch.empty(min(chunk_tokens, total), normalized_codebook.shape[0], device=queries.device)
    for start in range(0, total, chunk_tokens):
        chunk = queries[start : start + chunk_tokens]
        torch.mm(chunk, normalized_codebook.T, out=scores[: chunk.shape[0]])  # (n, K)
        codes[start : start + chunk.shape[0]] = scores[: chunk.shape[0]].argmax(dim=-1)
    return codes


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, N, D) raw LM embeddings, straight-through to the encoder
    codes: torch.Tensor  # (B, N) indices into the codebook
    token_ids: torch.Tensor  # (B, N) LM vocabulary ids
    commitment_loss: torch.Tensor  # scalar, unweighted mean((sg(e) - z)^2)
    usage_loss: torch.Tensor  # scalar: mean per-token code entropy minus entropy of the mean (0 when off)


class LanguageCodebook(nn.Module):
    """A frozen codebook made of (a subset of) an LM's input word embeddings.

    The embeddings are non-persistent buffers: rebuilt from the LM, never saved in checkpoints.
    """

    def __init__(
        self,
        word_embeddings: torch.Tensor,
        token_ids: list[int],
        chunk_tokens: int = 4096,
        usage_temperature: float = 0.01,
        usage_sample_tokens: int = 1024,
    ) -> None:
        super().__init__()
        vocab_rows = word_embeddings.shape[0]
        ids = torch.tensor(token_ids, dtype=torch.long)
        embeddings = word_embeddings.detach()[ids].float().clone()
        token_to_code = torch.full((vocab_rows,), -1, dtype=torch.long)
        token_to_code[ids] = torch.arange(len(ids))
        self.register_buffer("embeddings", embeddings, persistent=False)  # (K, D) raw
        self.register_buffer("normalized", F.normalize(embeddings, dim=-1), persistent=False)  # (K, D)
        self.register_buffer("code_to_token", ids, persistent=False)  # (K,)
        self.register_buffer("token_to_code", token_to_code, persistent=False)  # (V,), -1 = not a code
        self.chunk_tokens = chunk_tokens
        self.usage_temperature, self.usage_sample_tokens = usage_temperature, usage_sample_tokens

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, z: torch.Tensor, usage: bool = False) -> QuantizerOutput:
        """z: (B, N, D) encoder output in LM embedding space; `usage` adds the code-usage loss."""
        with torch.no_grad():
            codes = nearest_codes(z.detach().flatten(0, 1), self.normalized, self.chunk_tokens).view(z.shape[:2])
        embedded = self.embeddings[codes].to(z.dtype)  # (B, N, D)
        commitment = F.mse_loss(z.float(), embedded.float())  # gradient reaches z only: e is a constant
        quantized = z + (embedded - z).detach()  # straight-through estimator
        usage_loss = self.usage_loss(z) if usage else z.new_zeros(())
        return QuantizerOutput(quantized, codes, self.code_to_token[codes], commitment, usage_loss)

    def usage_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Entropy regulariser on soft code assignments (as in MaskGIT/MAGVIT-v2's LFQ): confident per
        token, spread over the codebook per batch. A frozen codebook cannot move towards unused
        encoder outputs, so without it the encoder tends to collapse onto a handful of codes."""
        flat = z.flatten(0, 1)
        stride = max(1, flat.shape[0] // self.usage_sample_tokens)
        sample = F.normalize(flat[::stride][: self.usage_sample_tokens].float(), dim=-1)  # (S, D)
        probs = (sample @ self.normalized.T / self.usage_temperature).softmax(dim=-1)  # (S, K)
        per_token = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean = probs.mean(0)
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
