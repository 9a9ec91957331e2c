"""Writing images: PNG files (atomically) and grids of originals over reconstructions."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from lqae.images.files import to_pil
from lqae.io import atomic_write_bytes, check_replaceable, is_png


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
    """Save (C, H, W) in [0, 1] as PNG atomically; `upscale` enlarges small images (nearest). An
    existing file is replaced only when it is a PNG (`check_png_output`)."""
    check_png_output(path)
    picture = to_pil(image)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def token_picture(
    image: torch.Tensor, reconstruction: torch.Tensor, words: list[str], grid: int, global_words: list[str],
    path: Path, cell: int = 96,
) -> None:
    """Write a PNG for a person: the image (left) beside its reconstruction (right), each `cell`
    pixels per patch, with each patch's word over its patch of both, and the global words above.
    image, reconstruction: (C, H, W) in [0, 1]; words: the grid x grid patch tokens in row order."""
    check_png_output(path)
    side, gap = cell * grid, cell // 4
    header = cell // 2 if global_words else 0
    font = ImageFont.load_default(size=max(10, cell // 7))
    canvas = Image.new("RGB", (2 * side + gap, header + side), "white")
    draw = ImageDraw.Draw(canvas)
    for column, picture in enumerate((image, reconstruction)):
        left = column * (side + gap)
        canvas.paste(to_pil(picture).resize((side, side), Image.NEAREST), (left, header))
        for index, word in enumerate(words):
            row, col = divmod(index, grid)
            x, y = left + col * cell + cell // 2, header + row * cell + cell // 2
            draw.rectangle((left + col * cell, header + row * cell, left + (col + 1) * cell - 1,
                            header + (row + 1) * cell - 1), outline=(255, 255, 255))
            # a dark outline keeps the word legible on any patch
            draw.text((x, y), _fit(word, font, cell - 4), fill="white", font=font, anchor="mm",
                      stroke_width=2, stroke_fill="black")
    if global_words:
        draw.text((canvas.width // 2, header // 2), "global: " + " ".join(global_words), fill="black", font=font,
                  anchor="mm")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def check_png_output(path: Path) -> None:
    """OutputError unless `path` is new or an older PNG: a mistyped `--out RUN/model.safetensors`
    must not cost the weights."""
    check_replaceable(Path(path), "PNG image", is_png)


def _fit(word: str, font, width: int) -> str:
    """The word, cut with an ellipsis where it is wider than `width` pixels."""
    if font.getlength(word) <= width:
        return word
    while word and font.getlength(word + "…") > width:
        word = word[:-1]
    return word + "…"
