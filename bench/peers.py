"""Peer bottlenecks for bench/quality.py: the same lqae ViT encoder and decoder, steps, batch,
augmentation and schedule as the preset, with the frozen LM vocabulary and LM channel swapped for

- `fsq`: finite scalar quantisation (Mentzer et al. 2023, arXiv 2309.15505), levels 8,8,8,6,5 =
  15,360 codes (13.9 bits per token; MiniLM's word vocabulary is 14.4);
- `vq`: a learned VQ, 16,384 codes of dim 32, cosine, k-means init, EMA updates;
- `continuous`: no quantiser, continuous tokens (the architecture's ceiling at this token budget).

FSQ and VQ come from vector-quantize-pytorch (a bench/test dependency). The peers never see the LM:
the decoder reads the (quantised) 384-d tokens directly where lqae's reads the LM's state.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lqae.images.augment import to_float
from lqae.presets import Preset
from lqae.images.batches import image_batches
from lqae.images.files import scan_image_folder
from lqae.training.data import EpochBatchSampler, TrainDataset
from lqae.images.output import comparison_grid, save_png
from lqae.metrics import psnr, ssim, usage_from_counts
from lqae.model.decoder_input import DecoderInput
from lqae.model.vit import Decoder, Encoder, init_weights
from lqae.training.parts import autocast, build_optimizer, lr_at

PEERS = ("fsq", "vq", "continuous")
FSQ_LEVELS = (8, 8, 8, 6, 5)
TOKEN_WIDTH = 384  # the width lqae's tokens have with MiniLM: the peers' encoder output and decoder input


class PeerAutoencoder(nn.Module):
    """lqae's Encoder -> a peer bottleneck -> lqae's Decoder; forward returns (reconstruction, codes, aux loss)."""

    def __init__(self, preset: Preset, kind: str) -> None:
        super().__init__()
        # the patch tokens only (the 16-token peers): lqae's global words come on top of them
        config = dataclasses.replace(
            preset.model, lm_width=TOKEN_WIDTH, encoder_output="linear", decoder_input="lm", global_tokens=0,
        )
        self.kind, self.image_size = kind, config.image_size
        self.encoder, self.decoder = Encoder(config), Decoder(config, DecoderInput())
        init_weights(self.encoder)
        init_weights(self.decoder)
        self.codebook_size = 0
        if kind == "fsq":
            from vector_quantize_pytorch import FSQ

            self.quantizer = FSQ(levels=list(FSQ_LEVELS), dim=TOKEN_WIDTH)
            self.codebook_size = self.quantizer.codebook_size
        elif kind == "vq":
            from vector_quantize_pytorch import VectorQuantize

            self.quantizer = VectorQuantize(
                dim=TOKEN_WIDTH, codebook_size=16384, codebook_dim=32, use_cosine_sim=True, kmeans_init=True,
                commitment_weight=0.25,
            )
            self.codebook_size = 16384
        elif kind != "continuous":
            raise ValueError(f"unknown peer {kind!r}; choose one of: {', '.join(PEERS)}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        z = self.encoder(images).z  # (B, N, D)
        aux = z.new_zeros(())
        codes = None
        if self.kind == "fsq":
            z, codes = self.quantizer(z)
        elif self.kind == "vq":
            z, codes, aux = self.quantizer(z)
        return self.decoder(z), codes, aux.sum()


def train_peer(kind: str, folder: Path, run_dir: Path, preset: Preset) -> dict:
    """Train one peer on folder/train with the preset's optimiser, schedule, batch, augmentation and
    precision; score it on folder/val. Returns the bench's figures for it."""
    train_config = preset.train
    torch.manual_seed(train_config.seed)
    model = PeerAutoencoder(preset, kind)
    optimizer = build_optimizer(model, train_config)
    train_folder = scan_image_folder(folder / "train")
    dataset = TrainDataset(train_folder, preset.model.image_size, train_config.crop_scale_min, train_config.hflip)
    sampler = EpochBatchSampler(len(train_folder), train_config.batch_size, train_config.seed)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0))
    steps = train_config.steps
    precision = autocast(train_config.precision, "cpu")  # the precision lqae trains in (--set precision=...)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, train_config)
        images = to_float(next(loader))  # (B, C, H, W) uint8 -> [0, 1], as the trainer does
        with precision:
            reconstruction, _, aux = model(images)
        loss = F.mse_loss(reconstruction.float(), images) + aux.float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 300 == 0:
            print(f"[{run_dir.name}] step {step + 1} recon {float(loss):.4f} "
                  f"{(time.perf_counter() - started) / (step + 1):.2f}s/step", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - started
    return {**evaluate_peer(model, folder / "val", run_dir / "heldout.png"), "train_seconds": round(train_seconds, 1),
            "sec_per_step": round(train_seconds / steps, 3)}


@torch.no_grad()
def evaluate_peer(model: PeerAutoencoder, val_dir: Path, grid_path: Path) -> dict:
    """Held-out PSNR, SSIM and codes used, with lqae eval's transform; a grid of 16 like lqae's."""
    model.eval()
    val = scan_image_folder(val_dir)
    size = model.image_size
    psnr_sum = ssim_sum = 0.0
    counts = torch.zeros(max(1, model.codebook_size), dtype=torch.long)
    shown = {round(i * (len(val) - 1) / 15) for i in range(16)}
    originals, reconstructions, seen = [], [], 0
    for _, images in image_batches(val.paths, size, 64):
        recon, codes, _ = model(images)
        recon = recon.clamp(0, 1)
        psnr_sum += psnr(recon, images) * len(images)
        ssim_sum += ssim(recon, images) * len(images)
        if codes is not None:
            counts += torch.bincount(codes.flatten().long(), minlength=counts.numel())
        picked = [i for i in range(len(images)) if seen + i in shown]
        originals.append(images[picked])
        reconstructions.append(recon[picked])
        seen += len(images)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(comparison_grid(torch.cat(originals), torch.cat(reconstructions)), grid_path, upscale=max(1, 128 // size))
    unique, perplexity = usage_from_counts(counts) if model.codebook_size else (0, 0.0)
    return {"psnr": round(psnr_sum / len(val), 3), "ssim": round(ssim_sum / len(val), 4), "unique_codes": unique,
            "code_perplexity": round(perplexity, 1), "grid": str(grid_path)}
