"""The per-pair reference of `fused_view_statistic`: the same per-Gaussian sums from the per-pair torch statistics
(`pair_stats.sum_over_pairs`, float64 on CPU), which the tests and `bench_fused_scoring.py` compare the kernels
with. A module of its own: it imports the scores (`fisher`, `importance`), which import the fused package."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nerfstudio_pruning.render.dispatch import enumerate_pairs
from nerfstudio_pruning.render.projection import ProjectedGaussians
from nerfstudio_pruning.scoring.fisher import _compact_m_contributions
from nerfstudio_pruning.scoring.fused import STATISTICS
from nerfstudio_pruning.scoring.importance import pixel_loss_change
from nerfstudio_pruning.scoring.pair_stats import sum_over_pairs
from nerfstudio_pruning.types import Views


def reference_view_statistic(
    statistic: str,
    proj: ProjectedGaussians,
    width: int,
    height: int,
    backgrounds: Optional[Tensor] = None,
    gt_image: Optional[Tensor] = None,
    loss: str = "energy",
) -> Tensor:
    """`fused_view_statistic` from the per-pair torch statistics (`pair_stats.sum_over_pairs`, float64 on CPU):
    the reference the kernels are tested against, on the same projection (one camera)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    pairs = enumerate_pairs(proj, 1, width, height)
    opacity = proj.opacities.double()
    gt_flat = None if gt_image is None else gt_image.reshape(width * height, -1).double()
    eye = torch.eye(4, dtype=proj.means2d.dtype, device=proj.means2d.device)[None]  # unused by the statistics
    view = Views(eye, eye[:, :3, :3], width, height, backgrounds)

    def per_pair(stats):
        if statistic == "moments":
            return _compact_m_contributions(stats)
        if statistic == "transmittance":
            return stats.transmittance[:, None]
        if statistic == "speedy":
            return ((opacity[stats.row] * stats.dI_dalpha.sum(-1)) ** 2)[:, None]
        residual = None if gt_flat is None else stats.pixel_color - gt_flat[stats.pixel]
        return pixel_loss_change(stats.removal_delta(), residual, loss)[:, None]

    return sum_over_pairs(proj, pairs, view, proj.means2d.shape[0], per_pair)
