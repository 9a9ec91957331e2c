"""`lqae eval`: reconstruction quality of a checkpoint on an image folder (PSNR, SSIM, code usage)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from lqae_cli.common import handle_errors
from lqae_cli.options import BatchSizeOption, DeviceOption, JsonOption, ModelOption, QuietOption, load_run
from lqae_cli.progress import Bars, wanted


@handle_errors
def evaluate(
    folder: Path = typer.Argument(..., help="Image folder (flat or one sub-folder per class), searched recursively."),
    model: ModelOption = None,
    grid_png: Optional[Path] = typer.Option(
        None, "--grid-png", help="Also write a PNG of 16 originals (spread over the folder) above their reconstructions.",
    ),
    max_images: Optional[int] = typer.Option(None, min=1, help="Evaluate at most this many images."),
    batch_size: BatchSizeOption = 64,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Report reconstruction quality: encode and decode every image (no masking) and compare.

    Prints PSNR, SSIM, distinct codes used, code perplexity, LM tokens per image, and how many tokens
    the LM's tokenizer gives when it re-reads the token text.

    Example: lqae eval data/digits/val -m runs/digits --grid-png recon.png
    """
    report_quality(folder, model, grid_png, max_images, batch_size, device, as_json, quiet)


def report_quality(folder, model, grid_png, max_images, batch_size, device, as_json: bool, quiet: bool) -> None:
    """The whole of `lqae eval` (also behind the deprecated `lqae encode --eval`)."""
    from lqae.images.source import scan_images
    from lqae.reconstruction import evaluate_folder

    images = scan_images(folder)
    total = min(len(images), max_images) if max_images else len(images)
    net = load_run(model, device)
    with Bars(wanted(quiet, total)) as bars:
        report = evaluate_folder(net, images, grid_png, batch_size, max_images, bars.counter("evaluate", total))
    if as_json:
        record = {"folder": str(folder), **report.as_dict()}
        if grid_png is not None:
            record["grid_png"] = str(grid_png)
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        rows = [
            ("images", f"{report.images}"),
            ("PSNR", f"{report.psnr:.2f} dB"),
            ("SSIM", f"{report.ssim:.4f}"),
            ("unique codes", f"{report.unique_codes} of {report.codebook_size}"),
            ("code perplexity", f"{report.code_perplexity:.1f}"),
            ("LM tokens per image", f"{report.tokens_per_image}"),
            ("text re-tokenised", f"{report.text_tokens_per_image:.1f} tokens per image"),
        ]
        width = max(len(name) for name, _ in rows)
        sys.stdout.write("".join(f"{name:<{width}}  {value}\n" for name, value in rows))
    if grid_png is not None and not quiet:
        sys.stderr.write(f"wrote originals (odd rows) over reconstructions (even rows) to {grid_png}\n")
