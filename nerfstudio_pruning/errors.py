"""The two refusals a run can meet; neither imports anything, so every layer may raise them.

- `PruningRefused`: raised by the algorithm layers (scoring, removal, schedules) when the numbers make an
  operation meaningless (NaN scores, a removal that would leave too few Gaussians). Nothing was changed.
- `InputError`: input a user can fix (bad data paths, unusable checkpoints), raised by the nerfstudio layer.

`ns-train` with this plugin's methods reports either as one line (no traceback) and exits with status 1, after
saving a checkpoint if training had started.
"""

from __future__ import annotations


class PruningRefused(ValueError):
    """An operation on the Gaussians refused because of what the numbers are; nothing was changed."""


class InputError(ValueError):
    """Input a user can fix; raised before anything is changed or written."""
