"""`lqae encode`: images -> token text of the frozen LM; a folder -> a token dataset; --eval: quality."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from lqae_cli.common import MODEL_OPTION_HELP, check_line_paths, handle_errors


class Format(str, Enum):
    text = "text"
    tokens = "tokens"
    ids = "ids"
    jsonl = "jsonl"


@handle_errors
def encode(
    inputs: Optional[List[Path]] = typer.Argument(None, help="Image files and/or folders (searched recursively)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", envvar="LQAE_MODEL", help=MODEL_OPTION_HELP),
    token_format: Format = typer.Option(
        Format.text, "--format", "-f",
        help="text: the tokenizer's decoded string (as in the paper); tokens: raw tokens joined by spaces "
        "(round-trips exactly through `lqae decode`); ids; jsonl: path, ids, tokens, text and grid per image.",
    ),
    grid: bool = typer.Option(False, "--grid", help="Show each image's tokens as its h x w patch grid (for a person)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Encode one folder into a token dataset FILE.safetensors (ids, labels from class sub-folders, paths, "
        "model config) that `lqae probe` and `lqae fewshot` read instead of images.",
    ),
    eval_dir: Optional[Path] = typer.Option(
        None, "--eval",
        help="Report reconstruction quality on this folder (PSNR, SSIM, code usage) instead of encoding.",
    ),
    grid_png: Path = typer.Option(
        Path("reconstructions.png"), "--grid-png", help="With --eval: PNG of originals over their reconstructions.",
    ),
    max_images: Optional[int] = typer.Option(None, min=1, help="With --eval: evaluate at most this many images."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    timings: bool = typer.Option(False, "--timings", help="Print where the time went, as JSON, to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    """Encode images into tokens of the model's frozen language model.

    One image prints its token text alone on stdout; several (or a folder): PATH<TAB>TEXT per line,
    or with --format jsonl one JSON object per line with the path inside.
    Images of any size are resized and centre-cropped to the model's resolution.
    The same image and model always give the same tokens.

    Example: lqae encode digit.png --model runs/digits --format tokens | lqae decode -m runs/digits --out back.png
    Folder to a token dataset: lqae encode data/digits/train -m runs/digits --out train.safetensors
    Reconstruction quality: lqae encode --eval data/digits/val -m runs/digits --grid-png recon.png
    """
    from lqae.errors import ConfigError

    started = time.perf_counter()
    inputs = inputs or []
    if eval_dir is not None:
        if inputs or out is not None:
            raise ConfigError("--eval takes the folder itself; do not also pass images or --out")
        _evaluate(eval_dir, model, token_format, grid_png, max_images, batch_size, device, timings, quiet, started)
        return
    if grid and token_format is Format.jsonl:
        raise ConfigError("--grid shows tokens or ids for a person; it cannot be combined with --format jsonl")
    if out is not None:
        if grid:
            raise ConfigError("--grid prints tokens for a person; --out writes a token dataset: pass one of them")
        if len(inputs) != 1 or not inputs[0].is_dir():
            raise ConfigError("--out encodes one folder: pass exactly one folder (class sub-folders become labels)")
        if out.suffix != ".safetensors":
            raise ConfigError(
                f"--out {out} must end in .safetensors (probe and fewshot recognise token datasets by it)"
            )
        _write_dataset(inputs[0], out, model, batch_size, device, timings, quiet, started)
        return
    _print_tokens(inputs, model, token_format, grid, batch_size, device, timings, quiet, started)


def _print_tokens(inputs, model, token_format, grid, batch_size, device, timings, quiet, started) -> None:
    from lqae.codec import EncodeTimings, collect_images, encode_images
    from lqae.tokentext import TokenText
    from lqae_cli.inference import count_progress, load_run, show_progress

    paths = collect_images(inputs)
    # several images: PATH<TAB>TEXT lines; jsonl carries the path inside each JSON object instead
    with_paths = (len(inputs) > 1 or any(p.is_dir() for p in inputs)) and token_format is not Format.jsonl
    if with_paths and not grid:
        check_line_paths(paths, "use --format jsonl, which quotes the path inside each JSON object, or rename the file")
    net = load_run(model, device, encode_only=True)
    loaded = time.perf_counter()
    token_text = TokenText.for_model(net)
    spent = EncodeTimings()
    bar = show_progress(quiet, len(paths)) and not sys.stdout.isatty()  # a person reading stdout sees it move
    with count_progress("encode", len(paths), bar) as advance:
        for chunk, ids in encode_images(net, paths, batch_size, spent):
            if grid:
                for path, row in zip(chunk, ids.tolist()):
                    _print_grid(token_text, row, str(path) if with_paths else None, token_format)
            else:
                lines = (
                    (f"{path}\t" if with_paths else "") + token_text.render(row, token_format.value, str(path))
                    for path, row in zip(chunk, ids.tolist())
                )
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            advance(len(chunk))
    if timings:
        _print_timings(spent, started, loaded)


def _print_grid(token_text, ids: list[int], title: str | None, token_format: Format) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, columns = token_text.grid
    cells = [str(i) for i in ids] if token_format is Format.ids else token_text.tokens(ids)
    table = Table(title=title, show_header=False, show_lines=True)
    for _ in range(columns):
        table.add_column(justify="center")
    for r in range(rows):
        table.add_row(*cells[r * columns : (r + 1) * columns])
    Console(file=sys.stdout, soft_wrap=False).print(table)


def _write_dataset(folder_dir, out, model, batch_size, device, timings, quiet, started) -> None:
    from lqae.codec import EncodeTimings
    from lqae.data import scan_image_folder
    from lqae.tokendata import encode_folder_to_file
    from lqae_cli.inference import count_progress, load_run, show_progress

    folder = scan_image_folder(folder_dir)
    net = load_run(model, device, encode_only=True)
    loaded = time.perf_counter()
    spent = EncodeTimings()
    with count_progress("encode", len(folder), show_progress(quiet, len(folder))) as advance:
        summary = encode_folder_to_file(net, folder, out, batch_size, advance, spent)
    if not quiet:
        side = net.config.image_size
        labels = f"{len(summary.classes)} classes" if summary.classes else "no classes (flat folder)"
        sys.stderr.write(
            f"wrote {summary.images} images x {summary.tokens_per_image} tokens ({labels}) to {summary.path}: "
            f"ids {_size(summary.id_bytes)} ({summary.id_dtype}) vs {_size(summary.pixel_bytes)} of {side}x{side} RGB "
            f"pixels, {summary.compression:.0f}x smaller; "
            f"file {_size(summary.file_bytes)} with labels, paths and config"
            + (f"; {summary.skipped} unreadable skipped" if summary.skipped else "") + "\n"
        )
    if timings:
        _print_timings(spent, started, loaded)


def _evaluate(eval_dir, model, token_format, grid_png, max_images, batch_size, device, timings, quiet, started) -> None:
    from lqae.data import scan_image_folder
    from lqae.evaluate import evaluate_folder
    from lqae_cli.inference import count_progress, load_run, show_progress

    folder = scan_image_folder(eval_dir)
    total = min(len(folder), max_images) if max_images else len(folder)
    net = load_run(model, device)
    with count_progress("evaluate", total, show_progress(quiet, total)) as advance:
        report = evaluate_folder(net, folder, grid_png, batch_size, max_images, advance)
    values = report.as_dict()
    if token_format is Format.jsonl:
        sys.stdout.write(json.dumps({"folder": str(eval_dir), "grid_png": str(grid_png), **values}) + "\n")
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
    if not quiet:
        sys.stderr.write(f"wrote originals (odd rows) over reconstructions (even rows) to {grid_png}\n")
    if timings:
        sys.stderr.write("timings: " + json.dumps({"total_s": round(time.perf_counter() - started, 4)}) + "\n")


def _print_timings(spent, started: float, loaded: float) -> None:
    values = {"start_s": round(loaded - started, 4), **spent.as_dict()}
    values["images_per_s"] = round(spent.images / max(spent.total_seconds, 1e-9), 2)
    values["model_images_per_s"] = round(spent.images / max(spent.model_seconds, 1e-9), 2)
    sys.stderr.write("timings: " + json.dumps(values) + "\n")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
