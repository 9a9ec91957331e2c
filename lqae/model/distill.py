"""Self-distillation of the global tokens between two augmented views (DINO: Caron et al. 2021,
arXiv 2104.14294), with frozen word embeddings as the prototypes.

Each global token g has its own candidate words (`LanguageCodebook.global_codes[g]`); its scores
are the similarities of its query to those words in the search space. The teacher is an EMA copy of
the global tokens' encoder (`lqae.model.vit.GlobalEncoder`); its scores are spread evenly over the
batch by Sinkhorn-Knopp (so one word cannot win every image; DINO's running centre left a few words
per token at small batches) and sharpened (a low temperature), and the student's distribution for
one view is trained towards the teacher's for the other. No labels and no paired text: the same
image under different crops must choose the same few words.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from lqae.config import Distillation


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp (SwAV: Caron et al. 2020, arXiv 2006.09882): soft assignments (N, G, V) whose
    rows each sum to 1 and whose columns share the N images (summed over all processes) evenly
    among the V words of each global token. `logits` (N, G, V) are scores over a temperature.
    Computed in the log domain: with sharp temperatures the plain form underflows to 0/0."""
    world = _world_size()
    log_q = logits.float().permute(1, 2, 0)  # (G, V, N)
    words, images = log_q.shape[1], log_q.shape[2] * world
    for _ in range(iterations):
        log_q = log_q - _logsumexp_over_images(log_q, world) - math.log(words)  # each word: 1/V of the mass
        log_q = log_q - log_q.logsumexp(1, keepdim=True) - math.log(images)  # each image: 1/N of it
    return (log_q + math.log(images)).exp().permute(2, 0, 1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _logsumexp_over_images(log_q: torch.Tensor, world: int) -> torch.Tensor:
    """log of each word's total over the images of every process: (G, V, 1)."""
    top = log_q.amax(2, keepdim=True)
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = (log_q - top).exp().sum(2, keepdim=True)
    if world > 1:
        dist.all_reduce(total)
    return top + total.log()


class SelfDistillation(nn.Module):
    """The EMA teacher (a copy of the model's `GlobalEncoder`) and the invariance loss; training
    state, saved with the optimiser's (never in model.safetensors)."""

    def __init__(self, model, config: Distillation) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(model.encoder.global_encoder).requires_grad_(False).eval()
        self.config = config

    def train(self, mode: bool = True) -> "SelfDistillation":
        super().train(mode)
        self.teacher.eval()  # running statistics, no batch statistics: the teacher only follows
        return self

    @torch.no_grad()
    def teacher_scores(self, images: torch.Tensor, codebook) -> torch.Tensor:
        """(B, G, V_g) the teacher's similarities of each global token to its words."""
        return codebook.global_scores(self.teacher(images)[0]).float()

    def loss(self, student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor,
             teacher_b: torch.Tensor) -> torch.Tensor:
        """Cross-entropy from the teacher's balanced, sharpened targets for one view to the student of
        the other, both ways, averaged over tokens and images. Inputs (B, G, V_g)."""
        scores = torch.cat([teacher_a, teacher_b])
        targets_a, targets_b = sinkhorn(scores / self.config.teacher_temperature).chunk(2)
        log_a = (student_a.float() / self.config.student_temperature).log_softmax(-1)
        log_b = (student_b.float() / self.config.student_temperature).log_softmax(-1)
        return -((targets_b * log_a).sum(-1).mean() + (targets_a * log_b).sum(-1).mean()) / 2

    @torch.no_grad()
    def update_teacher(self, encoder: nn.Module) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (the `GlobalEncoder`); buffers
        (running statistics) copied."""
        momentum = self.config.teacher_momentum
        for teacher, student in zip(self.teacher.parameters(), encoder.parameters()):
            teacher.lerp_(student.detach(), 1 - momentum)
        for teacher, student in zip(self.teacher.buffers(), encoder.buffers()):
            teacher.copy_(student)
