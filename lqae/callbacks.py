"""What the training loop reports, and the callback interface it reports to (minGPT-style: the loop
never prints). Light: no torch, so the CLI and trackers can name these types before training starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainInfo:
    """Sent once, before the first step."""

    total_steps: int
    start_step: int
    images: int  # training images found
    skipped: int  # unreadable files left out
    classes: int
    codebook_size: int
    tokens_per_image: int
    trainable_parameters: int
    device: str
    world_size: int
    peak_lr: float  # base_lr x batch size / 256
    base_lr: float = 0.0
    precision: str = "fp32"  # what --precision resolved to on this device: bf16 (autocast) or fp32


class TrainCallback:
    """Override what you need; every hook runs on rank 0 only."""

    def on_start(self, info: TrainInfo) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, run_dir: Path) -> None: ...
    def on_samples(self, step: int, path: Path) -> None: ...
