"""lqae's PSNR and SSIM against torchmetrics (a test-only dependency: the cross-check of our formulas)."""

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lqae.metrics import psnr, ssim


@pytest.fixture
def pair():
    torch.manual_seed(0)
    target = torch.rand(4, 3, 32, 32)
    return (target + 0.1 * torch.randn_like(target)).clamp(0, 1), target


def test_psnr_matches_torchmetrics_per_image_mean(pair):
    reconstruction, target = pair
    reference = peak_signal_noise_ratio(reconstruction, target, data_range=1.0, dim=(1, 2, 3))
    assert psnr(reconstruction, target) == pytest.approx(float(reference), abs=1e-4)


@pytest.mark.parametrize("window, sigma", [(11, 1.5), (7, 0.9)])
def test_ssim_matches_torchmetrics_on_the_valid_region(pair, window, sigma):
    """torchmetrics sizes its Gaussian window from sigma (int(3.5 sigma + 0.5) * 2 + 1) and averages a
    reflect-padded border too; ours averages the valid region only, as Wang et al. and scikit-image do."""
    reconstruction, target = pair
    _, full = structural_similarity_index_measure(
        reconstruction, target, sigma=sigma, data_range=1.0, return_full_image=True
    )
    border = (window - 1) // 2
    reference = full[..., border:-border, border:-border].mean()
    assert ssim(reconstruction, target, window=window, sigma=sigma) == pytest.approx(float(reference), abs=1e-5)
    assert ssim(target, target) == pytest.approx(1.0)
