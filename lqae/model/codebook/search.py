"""Exact nearest-code search and farthest-point spreading, shared by the search spaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_codes(
    vectors: torch.Tensor, normalized_codebook: torch.Tensor, chunk_tokens: int = 4096, k: int = 1
) -> torch.Tensor:
    """Exact nearest neighbour by the largest dot product of the L2-normalised query with each
    codebook row: (N, d) x (K, d) -> (N,) code indices, or with k > 1 the (N, k) nearest, nearest first.

    Chunked over tokens so memory stays at chunk_tokens x K scores whatever N is.
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):  # exact fp32 search under bf16 training
        queries = F.normalize(vectors.float(), dim=-1)
        total = queries.shape[0]
        codes = torch.empty(total, k, dtype=torch.long, device=queries.device)
        # one score buffer reused by every chunk: no fresh multi-hundred-MB allocation per chunk
        scores = torch.empty(min(chunk_tokens, total), normalized_codebook.shape[0], device=queries.device)
        for start in range(0, total, chunk_tokens):
            chunk = queries[start : start + chunk_tokens]
            block = scores[: chunk.shape[0]]
            torch.mm(chunk, normalized_codebook.T, out=block)  # (n, K)
            codes[start : start + chunk.shape[0]] = block.argmax(dim=-1, keepdim=True) if k == 1 else block.topk(k, dim=-1).indices
        return codes[:, 0] if k == 1 else codes


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
