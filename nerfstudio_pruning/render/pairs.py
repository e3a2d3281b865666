"""The (pixel, Gaussian) pairs a view composites under gsplat 1.4.0's rules, and their alpha and transmittance.

Rules, read from `gsplat/cuda/csrc/rasterize_to_pixels_fwd.cu` and `isect_tiles.cu` of gsplat 1.4.0:
- a Gaussian is considered for every pixel of every tile its 3-sigma radius touches (tile culling, not a
  per-pixel radius test), with pixel centres at (x + 0.5, y + 0.5);
- alpha = min(0.999, opacity * exp(-sigma)); pairs with sigma < 0 or alpha < 1/255 are skipped;
- Gaussians are composited front to back by camera-space depth; a pixel stops before the Gaussian that would
  bring its transmittance to 1e-4 or below (that Gaussian is excluded).

`find_pairs` lists the pairs that pass (candidates are generated rectangle by rectangle, each Gaussian's tiles
narrowed to where its alpha can reach 1/255, in bounded chunks), so memory grows with the pairs composited,
never with pixels x Gaussians. The torch reference compositor and the scores' per-pair statistics
(`nerfstudio_pruning/scoring/pair_stats.py`) are both built on this list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.projection import ProjectedGaussians

# gsplat 1.4.0 clamps alpha at 0.999 (rasterize_to_pixels_fwd.cu). The PUP paper's notation uses 0.99 (the
# original 3DGS kernel); we follow the library the models are trained with.
ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
# Candidate pairs evaluated at once while culling; bounds peak memory to a few hundred MB.
CANDIDATE_CHUNK = 1 << 21


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


def enumerate_pairs(proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = 16) -> Pairs:
    """Every (pixel, row) pair the rasterizer composites, sorted by pixel and front to back within a pixel.

    The one place pairs are enumerated for the scores: CPU tensors use the compiled kernel's tile lists unless
    NSP_CPU_RASTERIZER=torch; elsewhere the torch enumeration above.
    """
    from nerfstudio_pruning.render.rasterize import cpu_backend

    if not proj.means2d.is_cuda and cpu_backend() == "compiled":
        from nerfstudio_pruning.render.compiled import compiled_find_pairs

        return compiled_find_pairs(proj, n_cameras, width, height, tile_size)
    return find_pairs(proj, n_cameras, width, height, tile_size)
