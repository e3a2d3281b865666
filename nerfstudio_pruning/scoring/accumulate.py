"""The loop over views that every score is: a per-Gaussian sum of one contribution per view.

Fisher blocks, leave-one-out importance, LightGaussian's significance and the probe and first-order estimators
are all sums over training views of something computed from one view at a time. They share this loop, so
that memory stays at one view's worth and there is one place to add a progress bar or to spread the views
over several processes.

Across processes: when a `torch.distributed` process group is initialised (gloo for CPU tensors, nccl for CUDA
ones, as a multi-GPU nerfstudio run sets up), each rank takes every world_size-th view (rank, rank + world, ...)
and the per-rank totals are summed with one all-reduce, so every rank returns the same total, that of all views.
Every rank must call the score (a collective), as every rank of a data-parallel run does in its callbacks. The
deterministic scores equal a single process's up to the order of float64 additions
(tests/test_distributed_scoring.py); random ones (the probe estimator) draw their probes per rank, so they are
another sample of the same estimator.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from nerfstudio_pruning.types import Views


def process_share() -> Tuple[int, int]:
    """(rank, world size) of this process in the default process group; (0, 1) without one."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def sum_over_views(
    views: Views,
    per_view: Callable[[int, Views], Optional[Tensor]],
    total: Tensor,
    desc: str = "",
    progress: bool = False,
) -> Tensor:
    """Add `per_view(index, views[index])` for every view into `total` (in place) and return it.

    `per_view` returns a tensor shaped like `total`, or None: for a view that contributes nothing, or one that
    added its contribution into `total` itself (in place; cheaper when it touches a few rows of it). Across
    processes (module docstring) the views are shared out and `total` ends the same on every rank: rank 0's
    initial value plus every view's contribution.
    """
    rank, world_size = process_share()
    if world_size > 1 and rank != 0:
        # The all-reduce below sums every rank's `total`: the initial value must be counted once.
        total.zero_()
    indices = range(rank, len(views), world_size)
    for index in tqdm(indices, desc=desc, disable=not progress or rank != 0, leave=False):
        contribution = per_view(index, views[index])
        if contribution is not None:
            total += contribution
    if world_size > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total
