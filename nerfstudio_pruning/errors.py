"""The error type for input a user can fix: bad data paths, unusable checkpoints, impossible schedules."""

from __future__ import annotations


class InputError(ValueError):
    """Raised before anything is changed or written. `ns-train` with this plugin's methods reports it as one line
    (no traceback) and exits with status 1, after saving a checkpoint if training had started."""
