"""The baseline pruning scores the methods are compared against (higher = keep).

- `lightgaussian_significance`: LightGaussian's global significance, the sum over the pixels a Gaussian is
  composited into of opacity x transmittance, times its normalised volume^`volume_power` (0.1 in its paper);
- `opacity_scores`: the opacity alone;
- `random_scores`: a seeded random order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nerfstudio_pruning.render.backend import scores_fused
from nerfstudio_pruning.scoring.accumulate import sum_over_views
from nerfstudio_pruning.scoring.fused import fused_view_statistic
from nerfstudio_pruning.scoring.pair_stats import PairStatistics, project_and_enumerate, project_gaussians, sum_over_pairs
from nerfstudio_pruning.types import Gaussians, Views


@torch.no_grad()
def lightgaussian_significance(
    gaussians: Gaussians, views: Views, downscale: float = 1, volume_power: float = 0.1, progress: bool = False
) -> Tensor:
    """[N] float64 sum over views and composited pixels of opacity * T, times (volume / max volume)^volume_power."""
    g = gaussians.detach()
    opacity = g.opacities.double()

    def hits(stats: PairStatistics) -> Tensor:
        return opacity[stats.gaussian] * stats.transmittance

    fused = scores_fused(g.means)

    def view_hits(_: int, view: Views) -> Tensor:
        if fused:  # sums of T per Gaussian in one walk over gsplat's tile lists (`scoring.fused`)
            proj = project_gaussians(g, view)
            return opacity * fused_view_statistic("transmittance", proj, view.width, view.height)[:, 0]
        proj, pairs = project_and_enumerate(g, view)
        return sum_over_pairs(proj, pairs, view, len(g), hits)

    total = torch.zeros(len(g), dtype=torch.float64, device=g.device)
    total = sum_over_views(views.downscaled(downscale), view_hits, total, "LightGaussian significance", progress)
    log_volume = g.log_scales.double().sum(dim=-1)
    relative_volume = torch.exp(log_volume - log_volume.max())
    return total * relative_volume**volume_power


def opacity_scores(gaussians: Gaussians) -> Tensor:
    """[N] float64 opacities."""
    return torch.sigmoid(gaussians.opacity_logits.detach().double()).reshape(-1)


def random_scores(num_gaussians: int, seed: int, device: torch.device) -> Tensor:
    """[N] float64 uniform random scores from a seeded CPU generator (the same order on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_gaussians, generator=generator, dtype=torch.float64).to(device)
