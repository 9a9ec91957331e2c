"""Writing images: PNG files (atomically) and grids of originals over reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch

from lqae.data import to_pil
from lqae.io import atomic_write_bytes


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8, pad: int = 2) -> torch.Tensor:
    """Rows alternate originals and their reconstructions; (B, C, H, W) x2 -> (C, H', W')."""
    count = originals.shape[0]
    columns = min(columns, count)
    rows = []
    for start in range(0, count, columns):
        for batch in (originals, reconstructions):
            chunk = batch[start : start + columns].clamp(0, 1).cpu()
            if chunk.shape[0] < columns:
                filler = torch.ones(columns - chunk.shape[0], *chunk.shape[1:])
                chunk = torch.cat([chunk, filler])
            rows.append(chunk)
    tiles = torch.stack(rows)  # (R, columns, C, H, W)
    tiles = torch.nn.functional.pad(tiles, (pad, pad, pad, pad), value=1.0)
    r, c, ch, h, w = tiles.shape
    return tiles.permute(2, 0, 3, 1, 4).reshape(ch, r * h, c * w)


def save_png(image: torch.Tensor, path: Path, upscale: int = 1) -> None:
    """Save (C, H, W) in [0, 1] as PNG atomically; `upscale` enlarges small images (nearest)."""
    import io

    from PIL import Image

    picture = to_pil(image)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
