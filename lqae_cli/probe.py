"""`lqae probe` (being written)."""

from lqae_cli.common import handle_errors


@handle_errors
def probe() -> None:
    """Not written yet."""
    raise NotImplementedError("lqae probe is being written")
