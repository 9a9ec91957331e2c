"""`lqae fewshot` (being written)."""

from lqae_cli.common import handle_errors


@handle_errors
def fewshot() -> None:
    """Not written yet."""
    raise NotImplementedError("lqae fewshot is being written")
