"""`lqae encode`: images -> token text of the frozen LM on stdout, or a folder -> a token dataset file."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from lqae.errors import ConfigError
from lqae.tokentext import TokenForm, TokenText
from lqae_cli.common import check_line_paths, handle_errors
from lqae_cli.eval import report_quality
from lqae_cli.options import BatchSizeOption, DeviceOption, ModelOption, QuietOption, load_run, resolve_device
from lqae_cli.progress import Bars, wanted


@handle_errors
def encode(
    inputs: Optional[List[Path]] = typer.Argument(
        None, help="Image files and/or folders (searched recursively), or WebDataset tar shards (a .tar, a folder of "
        ".tar files, or shard-{000..009}.tar).",
    ),
    model: ModelOption = None,
    token_format: TokenForm = typer.Option(
        TokenForm.text, "--format", "-f",
        help="text: the tokenizer's decoded string (as in the paper); tokens: raw tokens joined by spaces "
        "(round-trips exactly through `lqae decode`); ids; jsonl: path, ids, tokens, text and grid per image.",
    ),
    grid: bool = typer.Option(False, "--grid", help="Show each image's tokens as its h x w patch grid (for a person)."),
    show: Optional[Path] = typer.Option(
        None, "--show", help="Also write a PNG for a person: the image beside its reconstruction, each patch's word "
        "over its patch and the global words above (one image).",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Encode one folder (or tar shards) into a token dataset FILE.safetensors (ids, labels from class "
        "sub-folders or .cls members, paths, model config) that `lqae probe` and `lqae fewshot` read instead of "
        "images. Under torchrun each process writes its share beside FILE, and FILE indexes them.",
    ),
    eval_dir: Optional[Path] = typer.Option(
        None, "--eval", hidden=True, help="Deprecated: use `lqae eval DIR` (reconstruction quality).",
    ),
    grid_png: Optional[Path] = typer.Option(None, "--grid-png", hidden=True, help="With the deprecated --eval."),
    max_images: Optional[int] = typer.Option(None, min=1, hidden=True, help="With the deprecated --eval."),
    batch_size: BatchSizeOption = 64,
    workers: Optional[int] = typer.Option(
        None, "--workers", min=0,
        help="Processes decoding images while the model runs (default: one per spare core, up to 4; none for a "
        "single batch). 0: decode in the main process.",
    ),
    device: DeviceOption = "auto",
    timings: bool = typer.Option(False, "--timings", help="Print where the time went, as JSON, to stderr."),
    quiet: QuietOption = False,
) -> None:
    """Encode images into tokens of the model's frozen language model.

    One image prints its token text alone on stdout; several (or a folder): PATH<TAB>TEXT per line,
    or with --format jsonl one JSON object per line with the path inside.
    Images of any size are resized and centre-cropped to the model's resolution.
    The same image and model always give the same tokens.

    Example: lqae encode digit.png --model runs/digits --format tokens | lqae decode -m runs/digits --out back.png
    Folder to a token dataset: lqae encode data/digits/train -m runs/digits --out train.safetensors
    Several processes: torchrun --nproc_per_node 4 -m lqae_cli encode /data/train -m runs/x --out train.safetensors
    (Reconstruction quality has its own command: lqae eval DIR.)
    """
    started = time.perf_counter()
    inputs = inputs or []
    if eval_dir is not None:
        if inputs or out is not None:
            raise ConfigError("--eval takes the folder itself; do not also pass images or --out")
        _deprecated_eval(eval_dir, model, token_format, grid_png, max_images, batch_size, device, timings, quiet, started)
        return
    if grid_png is not None or max_images is not None:
        raise ConfigError("--grid-png and --max-images belong to reconstruction quality: use `lqae eval DIR`")
    if show is not None:
        if out is not None or grid or len(inputs) != 1 or inputs[0].is_dir():
            raise ConfigError("--show draws one image: pass exactly one image file (and no --out or --grid)")
        if show.suffix.lower() != ".png":
            raise ConfigError(f"--show {show} must end in .png")
        _show(inputs[0], show, model, token_format, device, quiet)
        return
    if grid and token_format is TokenForm.jsonl:
        raise ConfigError("--grid shows tokens or ids for a person; it cannot be combined with --format jsonl")
    if out is not None:
        if grid:
            raise ConfigError("--grid prints tokens for a person; --out writes a token dataset: pass one of them")
        from lqae.images.shards import is_shard_source

        if len(inputs) != 1 or not (inputs[0].is_dir() or is_shard_source(inputs[0])):
            raise ConfigError(
                "--out encodes one folder: pass exactly one folder (class sub-folders become labels) or one set of "
                "tar shards"
            )
        if out.suffix != ".safetensors":
            raise ConfigError(
                f"--out {out} must end in .safetensors (probe and fewshot recognise token datasets by it)"
            )
        _write_dataset(inputs[0], out, model, batch_size, workers, device, timings, quiet, started)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("under torchrun, encode writes a token dataset in shards: pass --out FILE.safetensors")
    _print_tokens(inputs, model, token_format, grid, batch_size, workers, device, timings, quiet, started)


def _print_tokens(inputs, model, token_format, grid, batch_size, workers, device, timings, quiet, started) -> None:
    from lqae.codec import EncodeTimings, encode_images
    from lqae.images.source import collect_images, found_in_folders
    from lqae.images.batches import auto_workers
    from lqae.images.shards import is_shard_source

    paths = collect_images(inputs)
    workers = auto_workers(len(paths), batch_size) if workers is None else workers
    # several images: PATH<TAB>TEXT lines; jsonl carries the path inside each JSON object instead
    several = len(inputs) > 1 or any(p.is_dir() or is_shard_source(p) for p in inputs)
    with_paths = several and token_format is not TokenForm.jsonl
    if with_paths and not grid:
        check_line_paths(paths, "use --format jsonl, which quotes the path inside each JSON object, or rename the file")
    net = load_run(model, device, encode_only=True)
    loaded = time.perf_counter()
    token_text = TokenText.for_model(net)
    spent = EncodeTimings()
    bar = wanted(quiet, len(paths)) and not sys.stdout.isatty()  # a person reading stdout sees it move
    with Bars(bar) as bars:
        advance = bars.counter("encode", len(paths))
        for chunk, ids in encode_images(net, paths, batch_size, spent, found_in_folders(inputs), workers):
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


def _show(image: Path, picture: Path, model, token_format, device, quiet) -> None:
    from lqae.codec import picture_tokens
    from lqae.images.output import check_png_output
    from lqae.images.source import collect_images

    collect_images([image])  # a missing or corrupt image: one error line before the model loads
    check_png_output(picture)  # never over the weights or any other file that is not a PNG
    net = load_run(model, device)  # the decoder too: the picture shows the reconstruction
    ids = picture_tokens(net, image, picture)
    sys.stdout.write(TokenText.for_model(net).render(ids, token_format.value, str(image)) + "\n")
    if not quiet:
        sys.stderr.write(f"wrote {picture}\n")


def _print_grid(token_text, ids: list[int], title: str | None, token_format: TokenForm) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = columns = token_text.layout.grid
    cells = [str(i) for i in ids] if token_format is TokenForm.ids else token_text.tokens(ids)
    first, cells = token_text.layout.split(cells)
    caption = f"global: {' '.join(first)}" if first else None
    table = Table(title=title, caption=caption, show_header=False, show_lines=True)
    for _ in range(columns):
        table.add_column(justify="center")
    for r in range(rows):
        table.add_row(*cells[r * columns : (r + 1) * columns])
    Console(file=sys.stdout, soft_wrap=False).print(table)


def _write_dataset(folder_dir, out, model, batch_size, workers, device, timings, quiet, started) -> None:
    from lqae.codec import EncodeTimings
    from lqae.distributed import closing_process_group, rank_share, setup_distributed
    from lqae.images.batches import auto_workers
    from lqae.images.source import scan_images
    from lqae.tokendata import encode_folder_to_file

    rank, world, device = setup_distributed(resolve_device(device))  # one process, or torchrun's
    with closing_process_group(world):
        folder = scan_images(folder_dir)
        net = load_run(model, device, encode_only=True)
        loaded = time.perf_counter()
        spent = EncodeTimings()
        share = len(rank_share(len(folder), rank, world))
        workers = auto_workers(share, batch_size) if workers is None else workers
        quiet = quiet or rank > 0  # one process reports
        with Bars(wanted(quiet, share)) as bars:
            summary = encode_folder_to_file(
                net, folder, out, batch_size, bars.counter("encode", share), spent, workers, rank, world
            )
    if not quiet:
        side = net.config.image_size
        labels = f"{len(summary.classes)} classes" if summary.classes else "no classes (flat folder)"
        sys.stderr.write(
            f"wrote {summary.images} images x {summary.tokens_per_image} tokens ({labels}) to {summary.path}: "
            f"ids {_size(summary.id_bytes)} ({summary.id_dtype}) vs {_size(summary.pixel_bytes)} of {side}x{side} RGB "
            f"pixels, {summary.compression:.0f}x smaller; "
            f"file {_size(summary.file_bytes)} with labels, paths and config"
            + (f"; {summary.skipped} unreadable skipped" if summary.skipped else "")
            + (f"; {world} shards of one dataset, indexed by {summary.path}" if world > 1 else "") + "\n"
        )
    if timings and rank == 0:
        _print_timings(spent, started, loaded)


def _deprecated_eval(eval_dir, model, token_format, grid_png, max_images, batch_size, device, timings, quiet, started) -> None:
    sys.stderr.write(f"warning: `lqae encode --eval` is deprecated; use `lqae eval {eval_dir}`\n")
    as_json = token_format is TokenForm.jsonl
    report_quality(eval_dir, model, grid_png, max_images, batch_size, device, as_json, quiet)
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
