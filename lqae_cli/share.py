"""`lqae card` and `lqae push`: share a checkpoint on the Hugging Face hub with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lqae_cli.common import handle_errors

LICENSE_HELP = "License in the card's metadata (an SPDX-style id the hub knows)."


@handle_errors
def card(
    run_dir: Path = typer.Argument(..., help="Checkpoint folder written by `lqae train`."),
    repo_id: Optional[str] = typer.Option(None, "--repo", help="Hub id the usage lines name (default: the folder name)."),
    license: str = typer.Option("apache-2.0", help=LICENSE_HELP),
) -> None:
    """Write RUN_DIR/README.md, the model card `lqae push` uploads, so you can edit it first.

    Example: lqae card runs/digits --repo me/lqae-digits && $EDITOR runs/digits/README.md
    """
    from lqae.hub import write_card

    typer.echo(str(write_card(run_dir, repo_id, license)))


@handle_errors
def push(
    run_dir: Path = typer.Argument(..., help="Checkpoint folder written by `lqae train`."),
    repo_id: str = typer.Argument(..., help="Hub repo, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if missing; default main)."),
    license: str = typer.Option("apache-2.0", help=LICENSE_HELP),
) -> None:
    """Upload a checkpoint and its model card to the Hugging Face hub; never the optimiser state.

    One commit of config.json, model.safetensors and README.md (RUN_DIR/README.md when `lqae card`
    wrote one, else a fresh card). Prints the commit URL.

    Example: lqae push runs/digits me/lqae-digits --private   (then: lqae encode img.png -m me/lqae-digits)
    """
    from lqae.hub import push as push_run

    typer.echo(push_run(run_dir, repo_id, private=private, revision=revision, license=license))
