"""`lqae` entry point. Command modules import torch lazily, inside their functions."""

from __future__ import annotations

import typer

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


def main() -> None:
    app()
