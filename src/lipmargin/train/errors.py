"""The errors and warnings of training."""

from __future__ import annotations

__all__ = ["TrainingError", "CheckpointSkippedWarning"]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run folder); one-line message."""


class CheckpointSkippedWarning(UserWarning):
    """``fit(resume=True)`` skipped a damaged checkpoint newer than the one it continues from."""
