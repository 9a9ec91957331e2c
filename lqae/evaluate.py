"""Reconstruction quality of a model on an image folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lqae.data import ImageFolder, load_image
from lqae.metrics import psnr, ssim, usage_from_counts


@dataclass
class ReconstructionReport:
    images: int  # images evaluated
    psnr: float  # dB, mean over images
    ssim: float  # mean
    unique_codes: int  # distinct codes used over the whole folder
    code_perplexity: float  # exp(entropy) of the code histogram
    codebook_size: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_reconstruction(
    model,
    folder: ImageFolder,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ReconstructionReport, torch.Tensor, torch.Tensor]:
    """Encode and decode (no masking) every image; returns the report and the first 16
    originals and reconstructions (for a grid)."""
    model.eval()
    device = next(model.encoder.parameters()).device
    paths = folder.paths[:max_images] if max_images else folder.paths
    size = model.config.image_size
    psnr_sum = ssim_sum = 0.0
    counts = torch.zeros(model.codebook.size, dtype=torch.long)
    shown_in: list[torch.Tensor] = []
    shown_out: list[torch.Tensor] = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([load_image(p, size) for p in paths[start : start + batch_size]]).to(device)
        z = model.encoder(images)
        codes = model.codebook(z).codes
        token_ids = model.codebook.code_to_token[codes]
        recon = model.decode(token_ids)
        count = images.shape[0]
        for i in range(count):
            psnr_sum += psnr(recon[i : i + 1], images[i : i + 1])
        ssim_sum += ssim(recon, images) * count
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook.size)
        if sum(t.shape[0] for t in shown_in) < 16:
            shown_in.append(images.cpu())
            shown_out.append(recon.cpu())
        if progress:
            progress(count)
    total = len(paths)
    unique, perplexity = usage_from_counts(counts)
    report = ReconstructionReport(total, psnr_sum / total, ssim_sum / total, unique, perplexity, model.codebook.size)
    return report, torch.cat(shown_in)[:16], torch.cat(shown_out)[:16]

