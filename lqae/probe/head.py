"""The probe head (fixed standardisation -> LayerNorm -> Linear), its training on cached features,
and its scores (top-1, top-5, per class)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lqae.probe.config import ProbeConfig, ProgressCallback
from lqae.schedule import warmup_cosine


class ProbeHead(nn.Module):
    """Fixed per-feature standardisation (train statistics) -> LayerNorm -> Linear.

    Concatenated LM layers differ in scale and a few dimensions are outliers; standardising with the
    training mean/std first lets LayerNorm and one learning rate treat every layer alike.
    """

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))  # (F,)
        self.register_buffer("feature_std", torch.ones(feature_dim))  # (F,)
        self.norm = nn.LayerNorm(feature_dim)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> logits (B, C)."""
        return self.linear(self.norm((features - self.feature_mean) / self.feature_std))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: ProbeConfig,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    stage: str = "head",
) -> ProbeHead:
    """AdamW on cached features, warm-up then cosine; deterministic under `config.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ProbeHead(features.shape[1], num_classes)
    head.feature_mean.copy_(features.mean(dim=0))
    head.feature_std.copy_(features.std(dim=0, unbiased=False).clamp_min(1e-6))
    head.to(device).train()
    decay = [head.linear.weight]
    no_decay = [head.linear.bias, head.norm.weight, head.norm.bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.999),
    )
    total = config.epochs * math.ceil(len(features) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total, config.warmup_fraction)
    )
    generator = torch.Generator().manual_seed(config.seed)
    x_all, y_all = features.to(device), labels.to(device)
    for _ in range(config.epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        for start in range(0, len(features), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(head(x_all[batch]), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            progress(stage, 1, config.epochs)
    return head.eval()


@dataclass
class ProbeScores:
    """One probe's figures; accuracies are fractions in [0, 1]."""

    feature_dim: int
    train_top1: float
    top1: float
    top5: float | None  # only with more than 5 classes
    per_class: dict[str, float]  # val top-1 per class name
    feature_seconds: float  # extraction time for train + val
    head_seconds: float = 0.0  # head training time

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def head_logits(head: ProbeHead, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits (N, C) on the CPU for features (N, F), run on the head's device in batches."""
    device = head.linear.weight.device
    return torch.cat([head(features[i : i + batch_size].to(device)).cpu() for i in range(0, len(features), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return hit_rate((topk == labels.unsqueeze(1)).any(dim=1))


def hit_rate(hits: torch.Tensor) -> float:
    """Fraction of True in a boolean tensor (0 when it is empty)."""
    return int(hits.sum()) / max(1, hits.numel())


def score_head(
    head: ProbeHead, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    classes: list[str], seconds: float,
) -> ProbeScores:
    """Train top-1, val top-1 / top-5 / per-class top-1 of a trained head; `seconds` = extraction time."""
    val_logits = head_logits(head, val_x)
    hits = val_logits.argmax(dim=1) == val_y
    per_class = {name: hit_rate(hits[val_y == c]) for c, name in enumerate(classes)}
    return ProbeScores(
        feature_dim=train_x.shape[1],
        train_top1=accuracy(head_logits(head, train_x), train_y),
        top1=accuracy(val_logits, val_y),
        top5=accuracy(val_logits, val_y, 5) if len(classes) > 5 else None,
        per_class=per_class,
        feature_seconds=seconds,
    )
