"""The loop over views that every score is: a per-Gaussian sum of one contribution per view.

Fisher blocks, leave-one-out importance, LightGaussian's significance and the probe and first-order estimators
are all sums over training views of something computed from one view at a time. They share this loop, so
that memory stays at one view's worth and there is one place to add a progress bar or to spread the views
over several processes.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor
from tqdm import tqdm

from nerfstudio_pruning.types import Views


def sum_over_views(
    views: Views,
    per_view: Callable[[int, Views], Optional[Tensor]],
    total: Tensor,
    desc: str = "",
    progress: bool = False,
) -> Tensor:
    """Add `per_view(index, views[index])` for every view into `total` (in place) and return it.

    `per_view` returns a tensor shaped like `total`, or None for a view that contributes nothing.
    """
    for index in tqdm(range(len(views)), desc=desc, disable=not progress, leave=False):
        contribution = per_view(index, views[index])
        if contribution is not None:
            total += contribution
    return total
