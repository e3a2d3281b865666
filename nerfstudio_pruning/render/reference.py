"""The pure-torch reference rasterizer: gsplat 1.4.0's `rasterization()` on any torch device.

Same signature, outputs and `meta` keys as gsplat's, built from the shared projection (`projection.py`) and
pair list (`pairs.py`): only the pairs that contribute are recomputed with autograd and composited with
`index_add`. It is slow (hundreds of ns per pair) but simple, and it is the oracle the compiled CPU kernel is
tested against (select it with NSP_CPU_RASTERIZER=torch).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.frontend import rasterize_with
from nerfstudio_pruning.render.pairs import Pairs, find_pairs, pair_terms
from nerfstudio_pruning.render.projection import ProjectedGaussians


def composite(
    proj: ProjectedGaussians,
    pairs: Pairs,
    n_cameras: int,
    width: int,
    height: int,
    backgrounds: Optional[Tensor] = None,
    absgrad_target: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Alpha-composite the pairs. Returns colours [C, H, W, D] and alphas [C, H, W, 1].

    With `absgrad_target` (the tensor exposed as `meta["means2d"]`), backward also sets its `.absgrad`: the sum
    over pixels of the absolute per-pixel gradient, as gsplat's `absgrad=True`. One pair is one pixel, so the
    absolute value of each pair's gradient is exactly gsplat's per-pixel term.
    """
    n_pix = n_cameras * height * width
    channels = proj.colors.shape[-1]
    means2d_rows = proj.means2d.index_select(0, pairs.row)
    if absgrad_target is not None and means2d_rows.requires_grad:
        n_rows = proj.means2d.shape[0]
        rows = pairs.row

        def _record_absgrad(grad: Tensor) -> None:
            acc = torch.zeros(n_rows, 2, dtype=grad.dtype, device=grad.device).index_add_(0, rows, grad.abs())
            absgrad_target.absgrad = acc.view_as(absgrad_target)

        means2d_rows.register_hook(_record_absgrad)
    terms = pair_terms(proj, pairs, width, height, means2d_rows=means2d_rows)
    weight = terms.transmittance * terms.alpha
    image = torch.zeros(n_pix, channels, dtype=proj.colors.dtype, device=proj.colors.device)
    image = image.index_add(0, pairs.pixel, weight[:, None] * proj.colors.index_select(0, pairs.row))
    log_t_final = torch.zeros(n_pix, dtype=torch.float64, device=proj.colors.device)
    log_t_final = log_t_final.index_add(0, pairs.pixel, torch.log1p(-terms.alpha).double())
    t_final = torch.exp(log_t_final).to(proj.colors.dtype)
    if backgrounds is not None:
        bg = backgrounds.reshape(n_cameras, 1, channels).expand(n_cameras, height * width, channels)
        image = image + t_final[:, None] * bg.reshape(n_pix, channels)
    return image.view(n_cameras, height, width, channels), (1.0 - t_final).view(n_cameras, height, width, 1)


def torch_composite(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int,
    backgrounds: Optional[Tensor], absgrad_target: Optional[Tensor],
) -> Tuple[Tensor, Tensor, int]:
    """The reference compositor: the pair list, then `composite`."""
    pairs = find_pairs(proj, n_cameras, width, height, tile_size)
    colors, alphas = composite(proj, pairs, n_cameras, width, height, backgrounds, absgrad_target=absgrad_target)
    return colors, alphas, len(pairs)


def torch_rasterization(*args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """`gsplat.rendering.rasterization` in pure torch: same arguments, outputs and `meta` keys."""
    return rasterize_with(torch_composite, *args, **kwargs)
