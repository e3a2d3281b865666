"""Viewer elements the pruning methods add to ns-viewer: extra outputs coloured by a per-Gaussian score."""

from __future__ import annotations

import torch
from nerfstudio.viewer.viewer_elements import ViewerCheckbox


def score_output_toggle(name: str) -> ViewerCheckbox:
    """A viewer checkbox for an extra score-coloured render output.

    The extra output costs a second render per frame, so it is produced only when a viewer has installed this
    checkbox (its `gui_handle` exists) and it is ticked: ns-eval's timings and ns-export never pay for it.
    """
    return ViewerCheckbox(name, True, hint="Adds a render output with each Gaussian coloured by its score")


def viewer_wants(toggle: ViewerCheckbox) -> bool:
    return toggle.gui_handle is not None and bool(toggle.value)


def turbo_colours(values: torch.Tensor) -> torch.Tensor:
    """[N, 3] turbo colours of values in [0, 1]."""
    from nerfstudio.utils.colormaps import ColormapOptions, apply_colormap

    return apply_colormap(values.float()[:, None].clamp(0, 1), ColormapOptions(colormap="turbo"))
