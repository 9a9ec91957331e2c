"""Reconstruction and codebook-usage metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1], averaged over the batch."""
    return float(psnr_tensor(reconstruction, target))


def psnr_tensor(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`psnr` as a 0-d tensor on the images' device (no host sync, for per-step bookkeeping)."""
    mse = (reconstruction.clamp(0, 1).float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004), Gaussian window, per channel, images in [0, 1]."""
    x, y = reconstruction.clamp(0, 1).float(), target.float()
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def usage_from_counts(counts: torch.Tensor) -> tuple[int, float]:
    """(unique codes used, perplexity) from a histogram of code counts."""
    counts = counts.float()
    probs = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(math.exp(-(probs * probs.log()).sum()))
