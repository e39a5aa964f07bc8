"""What a failed multi-rank job raises."""

from __future__ import annotations

LOG_TAIL_CHARS = 4000  # characters of each rank's output an error message carries


class LaunchError(RuntimeError):
    """A multi-rank job failed; the message holds each failing rank's traceback and output tail."""


class LaunchTimeout(LaunchError):
    """A multi-rank job did not finish within its timeout (a hang); every rank was killed."""
