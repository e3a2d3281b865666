"""The gsplat-signature front end both CPU backends share: `gsplat.rendering.rasterization`'s arguments, outputs
and `meta` keys (gsplat 1.4.0) around a backend's projection and compositing.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.constants import EPS2D, FAR_PLANE, NEAR_PLANE, TILE_SIZE
from nerfstudio_pruning.render.projection import ProjectedGaussians, append_depth_channel, pack, project

# (projected rows, cameras, width, height, tile size, backgrounds [C, D] or None, absgrad target or None)
#   -> colours [C, H, W, D], alphas [C, H, W, 1], number of composited pairs
Compositor = Callable[
    [ProjectedGaussians, int, int, int, int, Optional[Tensor], Optional[Tensor]], Tuple[Tensor, Tensor, int]
]


def rasterize_with(
    compositor: Compositor,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = NEAR_PLANE,
    far_plane: float = FAR_PLANE,
    radius_clip: float = 0.0,
    eps2d: float = EPS2D,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = TILE_SIZE,
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
