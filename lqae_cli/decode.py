"""`lqae decode`: token text (or ids, or entries of a token dataset) -> images at the model's resolution."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lqae.errors import ConfigError, DataError, TokenError
from lqae.provenance import check_compatible
from lqae.tokentext import TokenText
from lqae_cli.common import handle_errors
from lqae_cli.options import AllowForeignOption, DeviceOption, ModelOption, QuietOption, load_run
from lqae_cli.progress import Bars, wanted


@handle_errors
def decode(
    tokens: Optional[List[str]] = typer.Argument(
        None, help="Token text of one image (quote it); `-` or nothing reads stdin, one image per line.",
    ),
    model: ModelOption = None,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="PNG to write; a folder (made if missing) when several images are decoded.",
    ),
    ids: bool = typer.Option(False, "--ids", help="The input is space-separated token ids (`encode --format ids`)."),
    text: bool = typer.Option(
        False, "--text",
        help="The input is decoded text (`encode --format text`): re-tokenise it; it must give exactly the model's "
        "sequence length. Default: the `tokens` form, falling back to re-tokenised text.",
    ),
    source: Optional[Path] = typer.Option(
        None, "--from", help="Decode entries of a token dataset (.safetensors) written by `lqae encode DIR --out`.",
    ),
    index: Optional[List[int]] = typer.Option(
        None, "--index", "-i", help="With --from: entry to decode (repeat for several; default: all entries).",
    ),
    allow_foreign: AllowForeignOption = False,
    batch_size: int = typer.Option(64, min=1, help="Images per decoder pass."),
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Turn token text back into an image at the model's resolution.

    Reads the `tokens` form exactly, ids with --ids, or text that re-tokenises to the model's length.
    Several lines on stdin (PATH<TAB>TOKENS or jsonl, as `lqae encode` prints) give a folder of images.
    Bad input (wrong count, unknown token or id) is one error line, and nothing is written.

    Example: lqae encode digit.png -m runs/digits --format tokens | lqae decode -m runs/digits --out back.png
    From a token dataset: lqae decode --from train.safetensors --index 0 --index 5 -m runs/digits --out decoded/
    """
    if out is None:
        raise ConfigError("no --out given: name the PNG to write (or a folder for several images)")
    if ids and text:
        raise ConfigError("--ids and --text name two different input forms; pass one")
    if source is not None:
        if tokens or ids or text:
            raise ConfigError("--from decodes a token dataset; do not also pass token text, --ids or --text")
        _decode_dataset(source, index, model, out, batch_size, device, quiet, allow_foreign)
        return
    if index:
        raise ConfigError("--index picks entries of a token dataset; use it with --from FILE.safetensors")
    form = "ids" if ids else "text" if text else "auto"
    _decode_text(_read_input(tokens), form, model, out, batch_size, device, quiet)


MAX_INPUT_CHARS = 256 << 20  # what stdin may hold: each line is checked against one image's size too


def _read_input(tokens: Optional[List[str]]) -> str:
    if tokens and tokens != ["-"]:
        return _utf8(" ".join(tokens), "the token text given")
    if not tokens and sys.stdin.isatty():
        raise TokenError("no token text given: pass it as an argument, or pipe it on stdin (`-` reads stdin)")
    try:
        text = sys.stdin.read(MAX_INPUT_CHARS + 1)
    except UnicodeDecodeError as exc:
        raise TokenError(f"stdin is not UTF-8 text ({exc.reason} at byte {exc.start}); token text is UTF-8") from None
    if len(text) > MAX_INPUT_CHARS:
        raise TokenError(
            f"stdin holds more than {MAX_INPUT_CHARS >> 20} MB of token text; decode it in parts (e.g. `split -l 10000`)"
        )
    return _utf8(text, "stdin")


def _utf8(text: str, where: str) -> str:
    """The text, if it is valid UTF-8 (bytes that were not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenError(f"{where} is not UTF-8 text (a stray byte at character {exc.start}); token text is UTF-8") from None
    return text


def _decode_text(raw: str, form: str, model, out: Path, batch_size: int, device: str, quiet: bool) -> None:
    import torch

    from lqae.codec import image_name, output_paths

    net = load_run(model, device)
    lines = TokenText.for_model(net).parse_lines(raw, form)
    paths = output_paths(out, [image_name(i, line.path) for i, line in enumerate(lines)])
    _write(net, torch.tensor([line.ids for line in lines], dtype=torch.long), paths, out, batch_size, quiet)  # (N, L)


def _decode_dataset(
    source: Path, index, model, out: Path, batch_size: int, device: str, quiet: bool, allow_foreign: bool
) -> None:
    from lqae.codec import image_name, output_paths
    from lqae.tokendata import read_token_dataset

    dataset = read_token_dataset(source)
    positions = _select_rows(len(dataset), index)
    net = load_run(model, device)
    check_compatible(dataset, net, source, allow_foreign)
    paths = output_paths(out, [image_name(i, dataset.paths[i]) for i in positions])
    _write(net, dataset.ids[positions], paths, out, batch_size, quiet)


def _select_rows(rows: int, index: Optional[List[int]]) -> list[int]:
    """Entries picked by `--index` (all when none), in the order given, each once; range-checked."""
    if not index:
        return list(range(rows))
    for i in index:
        if not 0 <= i < rows:
            raise DataError(f"index {i} is out of range: the token dataset holds {rows} entries (0..{rows - 1})")
    return list(dict.fromkeys(index))


def _write(net, ids, paths: list[Path], out: Path, batch_size: int, quiet: bool) -> None:
    """Decode (N, L) ids to their PNGs with a progress bar, then one summary line on stderr."""
    from lqae.codec import decode_to_pngs

    with Bars(wanted(quiet, len(paths))) as bars:
        decode_to_pngs(net, ids, paths, batch_size, bars.counter("decode", len(paths)))
    if quiet:
        return
    side = net.config.image_size
    where = paths[0] if len(paths) == 1 else f"{out}/"
    sys.stderr.write(f"wrote {len(paths)} image{'s' if len(paths) > 1 else ''} ({side}x{side}) to {where}\n")
