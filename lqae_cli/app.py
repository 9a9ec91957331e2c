"""`lqae` entry point. Command modules import torch lazily, inside their functions."""

from __future__ import annotations

import typer

from lqae_cli import decode as decode_cmd
from lqae_cli import encode as encode_cmd
from lqae_cli import eval as eval_cmd
from lqae_cli import fewshot as fewshot_cmd
from lqae_cli import probe as probe_cmd
from lqae_cli import share as share_cmd
from lqae_cli import train as train_cmd

app = typer.Typer(
    name="lqae",
    help="Language Quantized AutoEncoders: images as tokens of a frozen language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Language Quantized AutoEncoders: images as tokens of a frozen language model."""


app.command("train", no_args_is_help=True)(train_cmd.train)
app.command("encode")(encode_cmd.encode)
app.command("decode")(decode_cmd.decode)
app.command("eval", no_args_is_help=True)(eval_cmd.evaluate)
app.command("probe")(probe_cmd.probe)
app.command("fewshot")(fewshot_cmd.fewshot)
app.command("card", no_args_is_help=True)(share_cmd.card)
app.command("push", no_args_is_help=True)(share_cmd.push)


def main() -> None:
    app()
