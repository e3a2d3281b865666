"""Speedy-Splat's pruning score: the squared gradient of the rendered image with respect to each Gaussian's
footprint value, per pixel, summed over pixels and training views.

Source: Hanson, Tu, Lin, Singla, Zwicker, Goldstein, "Speedy-Splat: Fast 3D Gaussian Splatting with Sparse
Pixels and Sparse Primitives", CVPR 2025; official code github.com/j-alex-hanson/speedy-splat, `train.py`
(`score_func`, `prune`), and its rasterizer github.com/j-alex-hanson/speedy-splat-rasterizer (the submodule at
commit 0a4245f), `cuda_rasterizer/backward.cu` (`renderCUDA`, the `dL_dG2` accumulator added in commit 9afbb16).

What that code computes. Each training view is rendered and `image.sum()` is backpropagated once, so the loss is
L = sum over pixels p and channels c of I_pc (not the training loss: no ground truth enters). Inside the
backward kernel, for every (pixel, Gaussian) pair that is composited, the gradient of L with respect to that
pair's kernel value G = exp(-sigma) is dL/dG = o * dL/dalpha (alpha = o G), and its *square* is added to the
Gaussian's score: the square is taken per pixel, before summing over pixels, and the per-view results are
summed over all training views. In the renderer's terms (docs/methods.md, section 2):

    score_i = sum over views, sum over the pixels p of i's pairs of ( o_i sum_c dI_pc / dalpha_ip )^2,
    dI_pc / dalpha = T c_c - S_c / (1 - alpha)     (S: everything behind the pair, background included).

Here o_i is the effective opacity, i.e. times gsplat's antialiasing compensation in antialiased mode, since
that is what multiplies G there. On the 0.999 alpha clamp the true derivative of the image in G is zero; like
the official kernel, which ignores its own clamp in the backward pass, this keeps o dI/dalpha there, so that a
nearly opaque Gaussian is not scored as if its centre pixels did not matter.

Because of the per-pixel square this is not one backward pass of a per-Gaussian scalar here: the score is a
sum over (pixel, Gaussian) pairs, computed from `pair_stats.py`'s per-pair gradients like PUP's Fisher blocks,
without rendering through autograd. Views are taken at 1/downscale of their resolution (the official code scores
at the training resolution: downscale 1).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nerfstudio_pruning.render.backend import scores_fused
from nerfstudio_pruning.render.constants import TILE_SIZE
from nerfstudio_pruning.scoring.accumulate import sum_over_views
from nerfstudio_pruning.scoring.fused import fused_view_statistic
from nerfstudio_pruning.scoring.pair_stats import (
    DEFAULT_CHUNK_PAIRS,
    PairStatistics,
    project_and_enumerate,
    project_gaussians,
    sum_over_pairs,
)
from nerfstudio_pruning.types import Gaussians, Views


def speedy_scores(
    gaussians: Gaussians,
    views: Views,
    downscale: float = 1,
    tile_size: int = TILE_SIZE,
    progress: bool = False,
    chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS,
) -> Tensor:
    """[N] float64 Speedy-Splat scores (module docstring); 0 for a Gaussian no view composites."""
    g = gaussians.detach()
    n = len(g)

    fused = scores_fused(g.means)

    def view_scores(_: int, view: Views) -> Optional[Tensor]:
        if fused:  # one walk over gsplat's tile lists (`scoring.fused`)
            with torch.no_grad():
                proj = project_gaussians(g, view)
            return fused_view_statistic("speedy", proj, view.width, view.height, tile_size, view.background(0))[:, 0]
        proj, pairs = project_and_enumerate(g, view, tile_size)
        if len(pairs) == 0:
            return None
        opacity = proj.opacities.detach()

        def squared_footprint_gradient(stats: PairStatistics) -> Tensor:
            d_image_d_footprint = opacity[stats.row].to(stats.dI_dalpha.dtype) * stats.dI_dalpha.sum(dim=-1)
            return d_image_d_footprint * d_image_d_footprint

        return sum_over_pairs(proj, pairs, view, n, squared_footprint_gradient, chunk_pairs)

    total = torch.zeros(n, dtype=torch.float64, device=g.device)
    return sum_over_views(views.downscaled(downscale), view_scores, total, "Speedy-Splat scores", progress)
