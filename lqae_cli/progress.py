"""Rich progress display for training, on stderr."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lqae.train import TrainCallback, TrainInfo

stderr = Console(stderr=True)


class TrainProgress(TrainCallback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=stderr, disable=not enabled, transient=False,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def on_start(self, info: TrainInfo) -> None:
        if self.enabled:
            stderr.print(
                f"{info.images} images ({info.classes} classes, {info.skipped} unreadable skipped), "
                f"{info.tokens_per_image} tokens/image, codebook {info.codebook_size} codes, "
                f"{info.trainable_parameters / 1e6:.2f}M trainable parameters, {info.device} x{info.world_size}, "
                f"peak lr {info.peak_lr:.2e}"
            )
        self.task = self.progress.add_task("train", total=info.total_steps, completed=info.start_step, status="")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        status = ""
        if metrics:
            status = (
                f"loss {metrics['loss']:.4f} rec {metrics['recon_loss']:.4f} com/rec {metrics['commit_recon_ratio']:.2g} "
                f"|z| {metrics['encoder_norm']:.3g} psnr {metrics['psnr']:.1f} codes {metrics['unique_codes']} "
                f"ppl {metrics['code_perplexity']:.0f} {metrics['sec_per_step']:.2f}s/step"
            )
        self.progress.update(self.task, completed=step, status=status)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.progress.console.print(
                f"step {step}: val psnr {metrics['val_psnr']:.2f} dB, ssim {metrics['val_ssim']:.3f}, "
                f"{metrics['val_unique_codes']} codes, perplexity {metrics['val_code_perplexity']:.1f}"
            )

    def summary(self, result, run_dir: Path) -> None:
        if not self.enabled:
            return
        m = result.last_metrics
        line = f"done at step {result.step}: checkpoint in {run_dir}"
        if m:
            line += f"; train psnr {m['psnr']:.2f} dB (masked), {m['sec_per_step']:.2f} s/step"
        if result.validation:
            line += f"; val psnr {result.validation['val_psnr']:.2f} dB"
        stderr.print(line)
