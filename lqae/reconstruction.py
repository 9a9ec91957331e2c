"""Reconstruction quality of a model on an image folder: PSNR, SSIM, code usage (`lqae eval`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lqae.images.batches import image_batches
from lqae.errors import DataError
from lqae.images.files import ImageFolder
from lqae.images.source import scan_images
from lqae.images.output import check_png_output, comparison_grid, save_png
from lqae.metrics import psnr, ssim, usage_from_counts
from lqae.tokentext import TokenText


@dataclass
class ReconstructionReport:
    images: int  # images evaluated
    psnr: float  # dB, mean over images
    ssim: float  # mean
    unique_codes: int  # distinct codes used over the whole folder
    code_perplexity: float  # exp(entropy) of the code histogram
    codebook_size: int
    tokens_per_image: int = 0  # LM tokens per image (the sequence length L)
    text_tokens_per_image: float = 0.0  # mean tokens when the LM's tokenizer re-reads the token text

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_reconstruction(
    model,
    folder: ImageFolder,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: Callable[[int], None] | None = None,
    shown: Sequence[int] | None = None,
) -> tuple[ReconstructionReport, torch.Tensor, torch.Tensor]:
    """Encode and decode (no masking) every image (unreadable ones are skipped and named); returns
    the report and the originals and reconstructions at positions `shown` (default the first 16), for a grid."""
    model.eval()
    paths = folder.paths[:max_images] if max_images else folder.paths
    size = model.config.image_size
    psnr_sum = ssim_sum = 0.0
    counts = torch.zeros(model.codebook.size, dtype=torch.long)
    shown_in: list[torch.Tensor] = []
    shown_out: list[torch.Tensor] = []
    shown_set = set(range(16) if shown is None else shown)
    token_text = TokenText.for_model(model)
    text_tokens = 0
    start = 0
    for _, images in image_batches(paths, size, batch_size, model.device, skip_unreadable=True):
        codes = model.codebook(model.encoder(images).z).codes
        token_ids = model.codebook.code_to_token[codes]
        recon = model.decode(token_ids)
        count = images.shape[0]
        psnr_sum += psnr(recon, images) * count  # psnr() averages the per-image values: one host sync a batch
        ssim_sum += ssim(recon, images) * count
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook.size)
        texts = [token_text.text(row) for row in token_ids.tolist()]
        text_tokens += sum(map(len, model.tokenizer(texts, add_special_tokens=False)["input_ids"]))
        picked = [i for i in range(count) if start + i in shown_set]
        if picked:
            shown_in.append(images[picked].cpu())
            shown_out.append(recon[picked].cpu())
        if progress:
            progress(count)
        start += count
    total = start  # images evaluated: unreadable ones are skipped (and named) by image_batches
    if total == 0:
        raise DataError(f"none of the {len(paths)} images in {folder.root} could be read")
    unique, perplexity = usage_from_counts(counts)
    report = ReconstructionReport(
        total, psnr_sum / total, ssim_sum / total, unique, perplexity, model.codebook.size,
        model.config.num_tokens, text_tokens / total,
    )
    if not shown_in:
        empty = torch.empty(0, model.config.channels, size, size)
        return report, empty, empty.clone()
    return report, torch.cat(shown_in), torch.cat(shown_out)


def evaluate_folder(
    model,
    root: str | Path | ImageFolder,
    grid_path: str | Path | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: Callable[[int], None] | None = None,
    shown: int = 16,
) -> ReconstructionReport:
    """Reconstruction report on an image folder (a path or a scanned `ImageFolder`); with `grid_path`,
    also a PNG there of `shown` originals, spread over the folder (so over its classes), above their
    reconstructions."""
    if grid_path is not None:
        check_png_output(Path(grid_path))  # before the work, not after it
    folder = root if isinstance(root, ImageFolder) else scan_images(root)
    total = min(len(folder), max_images) if max_images else len(folder)
    count = min(shown, total)
    positions = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})
    report, originals, reconstructions = evaluate_reconstruction(
        model, folder, batch_size, max_images, progress, positions if grid_path is not None else ()
    )
    if grid_path is None:
        return report
    upscale = max(1, 128 // model.config.image_size)  # 32 px images are unreadable at 1:1
    save_png(comparison_grid(originals, reconstructions), Path(grid_path), upscale=upscale)
    return report

