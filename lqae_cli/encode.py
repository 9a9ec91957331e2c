"""`lqae encode` (being written)."""

from lqae_cli.common import handle_errors


@handle_errors
def encode() -> None:
    """Not written yet."""
    raise NotImplementedError("lqae encode is being written")
