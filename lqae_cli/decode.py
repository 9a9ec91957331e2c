"""`lqae decode` (being written)."""

from lqae_cli.common import handle_errors


@handle_errors
def decode() -> None:
    """Not written yet."""
    raise NotImplementedError("lqae decode is being written")
