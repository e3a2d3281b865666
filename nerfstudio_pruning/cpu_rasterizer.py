"""A pure-torch Gaussian rasterizer that follows gsplat 1.4.0's rules, for machines without CUDA.

gsplat's `rasterization()` needs CUDA. This module reproduces what it computes, with the same signature, on any
torch device, so that splatfacto-based models train and are tested on CPU-only machines. It is built on gsplat's
own pure-torch projection and spherical harmonics (`gsplat.cuda._torch_impl`), and reproduces its compositing
rules, read from `gsplat/cuda/csrc/rasterize_to_pixels_fwd.cu` and `isect_tiles.cu` of gsplat 1.4.0:

- a Gaussian is considered for every pixel of every tile its 3-sigma radius touches (tile culling, not a
  per-pixel radius test), with pixel centres at (x + 0.5, y + 0.5);
- alpha = min(0.999, opacity * exp(-sigma)); pairs with sigma < 0 or alpha < 1/255 are skipped;
- Gaussians are composited front to back by camera-space depth; a pixel stops before the Gaussian that would
  bring its transmittance to 1e-4 or below (that Gaussian is excluded);
- 2D covariances are dilated by eps2d, and with `rasterize_mode="antialiased"` opacities are multiplied by the
  compensation factor.

Rather than a dense pixels x Gaussians product, compositing works on the list of (pixel, Gaussian) pairs that
actually contribute: candidates are generated rectangle by rectangle (each Gaussian's tiles, narrowed to where
its alpha can reach 1/255) under `no_grad` in bounded chunks, filtered by the rules above, and only the survivors are recomputed with autograd. Memory therefore grows
with the pairs composited. The same pair list is what the per-pair statistics (Fisher blocks, leave-one-out
importance) are built from, see `pair_stats.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from torch import Tensor

# gsplat 1.4.0 clamps alpha at 0.999 (rasterize_to_pixels_fwd.cu). The PUP paper's notation uses 0.99 (the
# original 3DGS kernel); we follow the library the models are trained with.
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
# Candidate pairs evaluated at once while culling; bounds peak memory to a few hundred MB.
CANDIDATE_CHUNK = 1 << 21


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


@dataclass
class Pairs:
    """Contributing (pixel, projected Gaussian) pairs, sorted by pixel and front to back within a pixel.

    `pixel` indexes the flattened [C, H, W] image stack, `row` indexes `ProjectedGaussians`.
    """

    pixel: Tensor  # [P] int64
    row: Tensor  # [P] int64

    def __len__(self) -> int:
        return int(self.pixel.shape[0])


def segment_starts(sorted_keys: Tensor) -> Tensor:
    """For each element of a sorted key array, the index of the first element with the same key."""
    n = sorted_keys.shape[0]
    is_start = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    if n > 1:
        is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(n, device=sorted_keys.device)
    return torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), dim=0).values


def segmented_cumsum(values: Tensor, starts: Tensor, exclusive: bool) -> Tensor:
    """Cumulative sum restarted at every segment; `starts` from `segment_starts`.

    Done in float64 on one global cumsum: subtracting the running total at each segment start then loses
    ~1e-16 relative precision instead of float32's ~1e-7.
    """
    v = values.double()
    total = torch.cumsum(v, dim=0)
    before_segment = total[starts] - v[starts]
    inclusive = total - before_segment
    return inclusive - v if exclusive else inclusive


def _candidate_pixel_rects(
    means2d: Tensor, radii: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int, tile_size: int
) -> Tensor:
    """Pixel rectangles [x0, x1) x [y0, y1) holding every pixel where a Gaussian can pass gsplat's tests.

    gsplat visits every pixel of the tiles a Gaussian's 3-sigma radius touches (isect_tiles). Of those, only
    pixels with alpha >= 1/255 count, i.e. sigma <= log(255 * opacity); along x that region spans
    |dx| <= sqrt(2 log(255 o) Sigma_xx) (Sigma = inverse conic), likewise along y. Intersecting the tile
    rectangle with that box (plus a pixel of margin against rounding) drops no pair gsplat would composite and
    most of those it would reject, which is where a CPU spends its time.
    """
    tile_w = math.ceil(width / tile_size)
    tile_h = math.ceil(height / tile_size)
    tile_r = radii.to(means2d.dtype) / tile_size
    tx0 = torch.floor(means2d[:, 0] / tile_size - tile_r).clamp(0, tile_w)
    tx1 = torch.ceil(means2d[:, 0] / tile_size + tile_r).clamp(0, tile_w)
    ty0 = torch.floor(means2d[:, 1] / tile_size - tile_r).clamp(0, tile_h)
    ty1 = torch.ceil(means2d[:, 1] / tile_size + tile_r).clamp(0, tile_h)

    det = (conics[:, 0] * conics[:, 2] - conics[:, 1] ** 2).clamp_min(1e-20)
    level = 2.0 * torch.log((255.0 * opacities).clamp_min(1.0))  # 0 when no pixel can reach 1/255
    ext_x = torch.sqrt(level * conics[:, 2] / det)
    ext_y = torch.sqrt(level * conics[:, 0] / det)
    # pixel x is a candidate when its centre x + 0.5 lies within mean +- extent
    bx0 = torch.floor(means2d[:, 0] - ext_x - 0.5) - 1
    bx1 = torch.ceil(means2d[:, 0] + ext_x - 0.5) + 2
    by0 = torch.floor(means2d[:, 1] - ext_y - 0.5) - 1
    by1 = torch.ceil(means2d[:, 1] + ext_y - 0.5) + 2

    x0 = torch.maximum(tx0 * tile_size, bx0).clamp(0, width).long()
    x1 = torch.minimum(tx1 * tile_size, bx1).clamp(0, width).long()
    y0 = torch.maximum(ty0 * tile_size, by0).clamp(0, height).long()
    y1 = torch.minimum(ty1 * tile_size, by1).clamp(0, height).long()
    return torch.stack([x0, x1, y0, y1], dim=-1)


def _pair_alpha(dx: Tensor, dy: Tensor, conics: Tensor, opacities: Tensor) -> Tuple[Tensor, Tensor]:
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), ALPHA_MAX)
    return sigma, alpha


@torch.no_grad()
def find_pairs(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = 16
) -> Pairs:
    """Enumerate every (pixel, Gaussian) pair gsplat would composite, front to back per pixel."""
    device = proj.means2d.device
    visible = torch.nonzero(proj.radii > 0).squeeze(1)
    # Depth order first, then a stable sort by pixel keeps each pixel's list front to back (gsplat breaks
    # depth ties by row index, as a stable argsort does).
    visible = visible[torch.argsort(proj.depths[visible], stable=True)]
    rects = _candidate_pixel_rects(
        proj.means2d[visible], proj.radii[visible], proj.conics[visible], proj.opacities[visible], width, height, tile_size
    )
    rect_w = (rects[:, 1] - rects[:, 0]).clamp_min(0)
    rect_h = (rects[:, 3] - rects[:, 2]).clamp_min(0)
    counts = rect_w * rect_h
    ends = torch.cumsum(counts, dim=0)

    pixels, rows, alphas = [], [], []
    start = 0
    n_vis = visible.shape[0]
    while start < n_vis:
        # Take as many Gaussians as fit the candidate budget (at least one).
        base = ends[start - 1] if start > 0 else ends.new_zeros(())
        stop = int(torch.searchsorted(ends, base + CANDIDATE_CHUNK, right=True))
        stop = max(stop, start + 1)
        cnt = counts[start:stop]
        total = int(cnt.sum())
        if total > 0:
            local_gauss = torch.repeat_interleave(torch.arange(stop - start, device=device), cnt)
            offset_in_rect = torch.arange(total, device=device) - (torch.cumsum(cnt, 0) - cnt)[local_gauss]
            w = rect_w[start:stop][local_gauss]
            px = rects[start:stop, 0][local_gauss] + offset_in_rect % w
            py = rects[start:stop, 2][local_gauss] + offset_in_rect // w
            row = visible[start:stop][local_gauss]
            dx = proj.means2d[row, 0] - (px.to(proj.means2d.dtype) + 0.5)
            dy = proj.means2d[row, 1] - (py.to(proj.means2d.dtype) + 0.5)
            sigma, alpha = _pair_alpha(dx, dy, proj.conics[row], proj.opacities[row])
            keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
            pixel = proj.camera_ids[row] * (height * width) + py * width + px
            pixels.append(pixel[keep])
            rows.append(row[keep])
            alphas.append(alpha[keep])
        start = stop

    if not pixels:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Pairs(pixel=empty, row=empty.clone())
    pixel = torch.cat(pixels)
    row = torch.cat(rows)
    alpha = torch.cat(alphas)
    order = torch.argsort(pixel, stable=True)
    pixel, row, alpha = pixel[order], row[order], alpha[order]

    # Transmittance cut-off: a pair is kept while the transmittance *after* it stays above 1e-4.
    log_t_after = segmented_cumsum(torch.log1p(-alpha), segment_starts(pixel), exclusive=False)
    keep = log_t_after > math.log(TRANSMITTANCE_MIN)
    return Pairs(pixel=pixel[keep], row=row[keep])


@dataclass
class PairTerms:
    """Differentiable per-pair quantities of one composite (all [P] or [P, D])."""

    dx: Tensor  # mean2d - pixel centre, x
    dy: Tensor
    alpha: Tensor
    transmittance: Tensor  # T before this pair
    clamped: Tensor  # bool: alpha hit ALPHA_MAX (no gradient to mean2d, conic, opacity)
    starts: Tensor  # segment start index of each pair's pixel


def pair_terms(proj: ProjectedGaussians, pairs: Pairs, width: int, height: int, means2d_rows: Optional[Tensor] = None) -> PairTerms:
    """Recompute alpha and transmittance of each pair with autograd."""
    m = proj.means2d.index_select(0, pairs.row) if means2d_rows is None else means2d_rows
    x = (pairs.pixel % width).to(m.dtype) + 0.5
    y = ((pairs.pixel // width) % height).to(m.dtype) + 0.5
    dx = m[:, 0] - x
    dy = m[:, 1] - y
    opac = proj.opacities.index_select(0, pairs.row)
    sigma, alpha = _pair_alpha(dx, dy, proj.conics.index_select(0, pairs.row), opac)
    starts = segment_starts(pairs.pixel)
    log_t_before = segmented_cumsum(torch.log1p(-alpha), starts, exclusive=True)
    transmittance = torch.exp(log_t_before).to(alpha.dtype)
    clamped = (opac * torch.exp(-sigma)) > ALPHA_MAX
    return PairTerms(dx=dx, dy=dy, alpha=alpha, transmittance=transmittance, clamped=clamped.detach(), starts=starts)


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
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
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

    cam_ids = torch.arange(c, device=means.device).repeat_interleave(n)
    gauss_ids = torch.arange(n, device=means.device).repeat(c)
    proj = ProjectedGaussians(
        means2d=means2d.reshape(c * n, 2),
        conics=conics.reshape(c * n, 3),
        opacities=opac.reshape(c * n),
        depths=depths.reshape(c * n),
        radii=radii.reshape(c * n),
        colors=cols.reshape(c * n, cols.shape[-1]),
        camera_ids=cam_ids,
        gaussian_ids=gauss_ids,
    )
    unpacked = {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics, "opacities": opac}
    return proj, unpacked


def _append_depth_channel(proj: ProjectedGaussians, render_mode: str) -> ProjectedGaussians:
    if render_mode in ("RGB+D", "RGB+ED"):
        cols = torch.cat([proj.colors, proj.depths[:, None]], dim=-1)
    elif render_mode in ("D", "ED"):
        cols = proj.depths[:, None]
    else:
        return proj
    return ProjectedGaussians(**{**proj.__dict__, "colors": cols})


def _pack(proj: ProjectedGaussians) -> ProjectedGaussians:
    keep = torch.nonzero(proj.radii > 0).squeeze(1)
    return ProjectedGaussians(**{k: v[keep] for k, v in proj.__dict__.items()})


def cpu_rasterization(
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
) -> Tuple[Tensor, Tensor, Dict]:
    """`gsplat.rendering.rasterization` in pure torch: same arguments, outputs and `meta` keys."""
    if distributed:
        raise NotImplementedError("distributed rendering needs gsplat's CUDA backend")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    n_cams = viewmats.shape[0]
    proj, unpacked = project(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        radius_clip, eps2d, sh_degree, rasterize_mode, camera_model, covars,
    )
    proj = _append_depth_channel(proj, render_mode)
    if backgrounds is not None and render_mode in ("RGB+D", "RGB+ED"):
        backgrounds = torch.cat([backgrounds, torch.zeros_like(backgrounds[..., :1])], dim=-1)
    elif backgrounds is not None and render_mode in ("D", "ED"):
        backgrounds = torch.zeros_like(backgrounds[..., :1])

    meta: Dict = {"camera_ids": None, "gaussian_ids": None}
    if packed:
        proj = _pack(proj)
        meta.update(
            camera_ids=proj.camera_ids, gaussian_ids=proj.gaussian_ids, radii=proj.radii, means2d=proj.means2d,
            depths=proj.depths, conics=proj.conics, opacities=proj.opacities,
        )
    else:
        meta.update(unpacked)
    pairs = find_pairs(proj, n_cams, width, height, tile_size)
    render_colors, render_alphas = composite(
        proj, pairs, n_cams, width, height, backgrounds, absgrad_target=meta["means2d"] if absgrad else None
    )
    if render_mode in ("ED", "RGB+ED"):
        render_colors = torch.cat(
            [render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], dim=-1
        )
    meta.update(
        width=width, height=height, tile_size=tile_size, n_cameras=n_cams,
        tile_width=math.ceil(width / tile_size), tile_height=math.ceil(height / tile_size), n_pairs=len(pairs),
    )
    return render_colors, render_alphas, meta
