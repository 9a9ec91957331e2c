"""The training loss, in one place: pixel MSE, the commitment loss, and the two training-only
features: the reference's masking of the LM's input with its masked-LM loss, and the global words'
self-distillation between two views."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.config import TrainConfig
from lqae.model.autoencoder import LQAE, LQAEOutput
from lqae.model.distill import SelfDistillation

log = logging.getLogger(__name__)


class LossBreakdown(NamedTuple):
    reconstruction: torch.Tensor  # pixel MSE
    commitment: torch.Tensor  # mean((sg(e) - z)^2)
    mlm: torch.Tensor  # LM-head cross-entropy at masked positions (0 without a mask or an MLM head)
    invariance: torch.Tensor  # the global words' self-distillation loss (0 without global words)


class Objective(nn.Module):
    """The model and what training adds to it: the mask, the MLM head, the self-distillation
    teacher. `forward` runs the model on a batch and returns (output, loss parts, weighted loss);
    `lqae.training` wraps this module (in DDP with several processes)."""

    def __init__(self, model: LQAE, config: TrainConfig, mlm_head: nn.Module | None = None) -> None:
        """`mlm_head`: the frozen LM's masked-LM head, used when masking (None: the LM has none)."""
        super().__init__()
        self.model = model
        self.commitment_weight, self.mask, self.distill_weight = config.commitment_weight, config.mask, config.distill.weight
        self.masks = config.mask.ratio > 0 and model.reads.reads_lm
        if self.masks and model.mask_embedding is None:
            log.warning("LM %s has no mask token: masking disabled", model.config.lm_name)
            self.masks = False
        self.mlm_head = mlm_head if self.masks and config.mask.mlm_weight > 0 else None
        if self.masks and config.mask.mlm_weight > 0 and mlm_head is None:
            log.warning("LM %s has no MLM head: the MLM loss is skipped", model.config.lm_name)
        distills = model.layout.global_tokens and config.distill.weight > 0
        self.distill = SelfDistillation(model, config.distill) if distills else None

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if self.mlm_head is not None:
            self.mlm_head.eval()  # frozen, as the LM
        return self

    def forward(
        self, images: torch.Tensor, second_view: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> tuple[LQAEOutput, LossBreakdown, torch.Tensor]:
        """images (B, C, H, W) in [0, 1], the view reconstructed; `second_view` (B, C, H, W): another
        augmentation of the same images, for the self-distillation; `generator` draws the mask."""
        mask = self.sample_mask(images.shape[0], images.device, generator) if self.masks and self.training else None
        out = self.model(images, mask)
        quantized = out.quantized
        losses = LossBreakdown(
            F.mse_loss(out.reconstruction.float(), images.float()),
            quantized.commitment,
            self._mlm_loss(out.lm_hidden, quantized.token_ids, mask),
            self._invariance(images, second_view, quantized.global_scores),
        )
        loss = (
            losses.reconstruction + self.commitment_weight * losses.commitment + self.mask.mlm_weight * losses.mlm
            + self.distill_weight * losses.invariance
        )
        return out, losses, loss

    def sample_mask(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool: each patch token masked with probability mask.ratio, never a global word."""
        layout, sample_device = self.model.layout, generator.device if generator else device
        noise = torch.rand((batch, layout.patches), generator=generator, device=sample_device)
        patches = (noise < torch.full((batch, 1), self.mask.ratio, device=sample_device)).to(device)
        return torch.cat([patches.new_zeros(batch, layout.global_tokens), patches], dim=1)

    def _mlm_loss(self, hidden: torch.Tensor | None, token_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.mlm_head is None or mask is None or not mask.any():
            return token_ids.new_zeros((), dtype=torch.float32)
        logits = self.mlm_head(hidden[mask])  # (M, V)
        return F.cross_entropy(logits.float(), token_ids[mask])

    def _invariance(self, images: torch.Tensor, second_view: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Each view's global words must choose the words the teacher chose for the other view."""
        if self.distill is None or second_view is None:
            return images.new_zeros((), dtype=torch.float32)
        codebook = self.model.codebook
        second = codebook.global_scores(self.model.encoder.global_encoder(second_view)[0])  # (B, G, V_g)
        teacher_a, teacher_b = self.distill.teacher_scores(images, codebook), self.distill.teacher_scores(second_view, codebook)
        return self.distill.loss(scores, second, teacher_a, teacher_b)
