"""Projection of Gaussians into cameras, as gsplat 1.4.0's `rasterization()` does before compositing.

Built on gsplat's own pure-torch projection and spherical harmonics (`gsplat.cuda._torch_impl`), so it runs on
any torch device and is differentiable. Every backend shares it: the torch reference compositor, the compiled
CPU kernel and the per-pair statistics of the scores. 2D covariances are dilated by eps2d; with
`rasterize_mode="antialiased"` opacities are multiplied by the compensation factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from torch import Tensor

from nerfstudio_pruning.render.constants import EPS2D, FAR_PLANE, NEAR_PLANE


@dataclass
class ProjectedGaussians:
    """Per-(camera, Gaussian) quantities after projection, flattened to M rows.

    Unpacked: M = C * N and row k is camera k // N, Gaussian k % N. Packed: only the visible rows.
    """

    means2d: Tensor  # [M, 2]
    conics: Tensor  # [M, 3]
    opacities: Tensor  # [M], compensation applied
    depths: Tensor  # [M]
    radii: Tensor  # [M] int32, 0 = culled
    colors: Tensor  # [M, D]
    camera_ids: Tensor  # [M] int64
    gaussian_ids: Tensor  # [M] int64


def project(
    means: Tensor,
    quats: Optional[Tensor],
    scales: Optional[Tensor],
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
    rasterize_mode: str = "classic",
    camera_model: str = "pinhole",
    covars: Optional[Tensor] = None,
) -> Tuple[ProjectedGaussians, Dict[str, Tensor]]:
    """Project Gaussians and evaluate their colours, as gsplat's `rasterization()` does before compositing.

    Returns the flattened unpacked rows and the [C, N, ...] tensors that go into `meta`.
    """
    if camera_model != "pinhole":
        raise NotImplementedError(f"the CPU rasterizer supports camera_model='pinhole' only, got {camera_model!r}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"unknown rasterize_mode {rasterize_mode!r}")
    n = means.shape[0]
    c = viewmats.shape[0]
    if covars is None:
        covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
        calc_compensations=(rasterize_mode == "antialiased"),
    )
    if radius_clip > 0:
        radii = torch.where(radii.float() <= radius_clip, torch.zeros_like(radii), radii)
    opac = opacities[None, :].expand(c, n)
    if compensations is not None:
        opac = opac * compensations

    if sh_degree is None:
        cols = colors if colors.dim() == 3 else colors[None].expand(c, -1, -1)
    else:
        shs = colors if colors.dim() == 4 else colors[None].expand(c, -1, -1, -1)
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        dirs = means[None, :, :] - campos[:, None, :]
        # Only visible rows are ever composited; evaluating (and differentiating) SH for the others is most of
        # the cost when a view sees a small part of the scene. gsplat leaves culled rows at zero too.
        visible = radii > 0
        cols = torch.zeros(c, n, 3, dtype=means.dtype, device=means.device)
        # gsplat adds 0.5 and clamps at 0 to match the original 3DGS CUDA backend.
        cols[visible] = torch.clamp_min(_spherical_harmonics(sh_degree, dirs[visible], shs[visible]) + 0.5, 0.0)

    return flattened(means2d, conics, depths, opac, cols, radii)


def flattened(means2d: Tensor, conics: Tensor, depths: Tensor, opacities: Tensor, colors: Tensor,
              radii: Tensor) -> Tuple[ProjectedGaussians, Dict[str, Tensor]]:
    """[C, N, ...] projection outputs as the flat camera-major rows the compositors take, and as gsplat's `meta`."""
    c, n = radii.shape[:2]
    device = means2d.device
    proj = ProjectedGaussians(
        means2d=means2d.reshape(c * n, 2),
        conics=conics.reshape(c * n, 3),
        opacities=opacities.reshape(c * n),
        depths=depths.reshape(c * n),
        radii=radii.reshape(c * n),
        colors=colors.reshape(c * n, colors.shape[-1]),
        camera_ids=torch.arange(c, device=device).repeat_interleave(n),
        gaussian_ids=torch.arange(n, device=device).repeat(c),
    )
    unpacked = {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics, "opacities": opacities}
    return proj, unpacked


def append_depth_channel(proj: ProjectedGaussians, render_mode: str) -> ProjectedGaussians:
    if render_mode in ("RGB+D", "RGB+ED"):
        cols = torch.cat([proj.colors, proj.depths[:, None]], dim=-1)
    elif render_mode in ("D", "ED"):
        cols = proj.depths[:, None]
    else:
        return proj
    return ProjectedGaussians(**{**proj.__dict__, "colors": cols})


def pack(proj: ProjectedGaussians) -> ProjectedGaussians:
    keep = torch.nonzero(proj.radii > 0).squeeze(1)
    return ProjectedGaussians(**{k: v[keep] for k, v in proj.__dict__.items()})
