"""Exceptions that the CLI turns into one-line messages and documented exit codes.

Every error a user can cause (bad recipe, bad data, a held lock) derives from
:class:`OlmError`; the CLI prints ``error: <message>`` and exits with ``exit_code``.
Anything else is a bug and is shown with its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RELEASED = 3  # trained and checkpointed, but the release gate kept the previous release
EXIT_LOCKED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class OlmError(Exception):
    """An error caused by input or environment, reported without a traceback."""

    exit_code: int = EXIT_FAILURE


class RecipeError(OlmError):
    """The recipe (or a command-line override) is invalid."""

    exit_code = EXIT_USAGE


class DataError(OlmError):
    """A shard or eval file cannot be read."""


class CheckpointError(OlmError):
    """A checkpoint is missing, incomplete or could not be written."""


class LockHeldError(OlmError):
    """Another olm process holds the run directory."""

    exit_code = EXIT_LOCKED


class TrainingDivergedError(OlmError):
    """Loss or gradients stayed NaN/Inf for too many consecutive steps."""


class CheckpointLoadError(CheckpointError):
    """A checkpoint verified on disk but could not be loaded (the caller falls back to an older one)."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
