"""Typed errors. The CLI turns any `LQAEError` into one stderr line and a non-zero exit."""


class LQAEError(Exception):
    """Base class for errors a user can fix; the message says how."""

    exit_code = 1


class ConfigError(LQAEError):
    """An invalid configuration value or config file."""


class DataError(LQAEError):
    """Missing, empty or unreadable image folders and files."""


class CheckpointError(LQAEError):
    """A missing, incomplete or mismatched checkpoint."""


class LMNotFoundError(LQAEError):
    """The language model cannot be found locally or on the hub."""


class TokenError(LQAEError):
    """Token text or ids that do not fit the model (unknown token, wrong count)."""


class LLMError(LQAEError):
    """A language-model backend failed (unreachable server, missing log-probs, ...)."""


class OutputError(LQAEError):
    """A result cannot be written (disk full, no permission); what was there before is kept."""


class TrainingError(LQAEError):
    """Training cannot go on (the loss or gradients became non-finite); the last good checkpoint is kept."""
