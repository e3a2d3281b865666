"""The pure-torch reference rasterizer: gsplat 1.4.0's `rasterization()` on any torch device.

Same signature, outputs and `meta` keys as gsplat's, built from the shared projection (`projection.py`) and
pair list (`pairs.py`): only the pairs that contribute are recomputed with autograd and composited with
`index_add`. It is slow (hundreds of ns per pair) but simple, and it is the oracle the compiled CPU kernel is
tested against (select it with NSP_CPU_RASTERIZER=torch).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.pairs import Pairs, find_pairs, pair_terms
from nerfstudio_pruning.render.projection import ProjectedGaussians, append_depth_channel, pack, project



# (projected rows, cameras, width, height, tile size, backgrounds [C, D] or None, absgrad target or None)
#   -> colours [C, H, W, D], alphas [C, H, W, 1], number of composited pairs
Compositor = Callable[
    [ProjectedGaussians, int, int, int, int, Optional[Tensor], Optional[Tensor]], Tuple[Tensor, Tensor, int]
]


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



def rasterize_with(
    compositor: "Compositor",
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: str = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: str = "classic",
    channel_chunk: int = 32,
    distributed: bool = False,
    camera_model: str = "pinhole",
    covars: Optional[Tensor] = None,
    *,
    projector: Callable[..., Tuple[ProjectedGaussians, Dict[str, Tensor]]] = project,
) -> Tuple[Tensor, Tensor, Dict]:
    """`gsplat.rendering.rasterization`'s arguments, outputs and `meta` keys around a CPU `compositor`.

    Everything but compositing and projection is shared by the CPU backends: argument checks, the depth channel
    of the D/ED modes, packing, `meta`, and the expected-depth division. `projector` has `project`'s signature
    and results (the compiled backend passes its own).
    """
    if distributed:
        raise NotImplementedError("distributed rendering needs gsplat's CUDA backend")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    n_cams = viewmats.shape[0]
    proj, unpacked = projector(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        radius_clip, eps2d, sh_degree, rasterize_mode, camera_model, covars,
    )
    proj = append_depth_channel(proj, render_mode)
    if backgrounds is not None and render_mode in ("RGB+D", "RGB+ED"):
        backgrounds = torch.cat([backgrounds, torch.zeros_like(backgrounds[..., :1])], dim=-1)
    elif backgrounds is not None and render_mode in ("D", "ED"):
        backgrounds = torch.zeros_like(backgrounds[..., :1])

    meta: Dict = {"camera_ids": None, "gaussian_ids": None}
    if packed:
        proj = pack(proj)
        meta.update(
            camera_ids=proj.camera_ids, gaussian_ids=proj.gaussian_ids, radii=proj.radii, means2d=proj.means2d,
            depths=proj.depths, conics=proj.conics, opacities=proj.opacities,
        )
    else:
        meta.update(unpacked)
    render_colors, render_alphas, n_pairs = compositor(
        proj, n_cams, width, height, tile_size, backgrounds, meta["means2d"] if absgrad else None
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    meta.update(
        width=width, height=height, tile_size=tile_size, n_cameras=n_cams,
        tile_width=math.ceil(width / tile_size), tile_height=math.ceil(height / tile_size), n_pairs=n_pairs,
    )
    return render_colors, render_alphas, meta


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
