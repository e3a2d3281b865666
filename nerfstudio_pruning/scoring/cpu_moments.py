"""PUP's Fisher passes in the compiled CPU kernels: per-Gaussian gradient moments M, projection Jacobians A, and
the blocks A^T M A (what `fisher.py` computes with torch elsewhere; docs/fisher.md, "Compiled passes").

`compiled_gradient_moments` walks the tile lists the compiled rasterizer builds (`render.compiled.bin_tiles`)
with the rasterizer's own compositing walk (`render/cpu/compositing.py`: `open_pixels`, `front_to_back`,
`pixels_reached`), so its pairs are the rasterizer's; `compiled_projection_jacobian` runs the projection's
backward kernel (`render/cpu/projection.py`); `compiled_add_fisher_blocks` assembles the blocks. numba and the
kernels are loaded when this module is imported, which `fisher.py` does only where the compiled backend runs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from numba import prange
from torch import Tensor

from nerfstudio_pruning.render.constants import ALPHA_MAX, EPS2D, TILE_SIZE
from nerfstudio_pruning.render.compiled import bin_tiles, no_background
from nerfstudio_pruning.render.cpu.binning import G_C0, G_C1, G_C2, G_MX, G_MY, G_OPACITY, tile_box
from nerfstudio_pruning.render.cpu.compositing import (
    LANES,
    candidate_buffers,
    front_to_back,
    front_to_back_state,
    open_pixels,
    pixels_reached,
)
from nerfstudio_pruning.render.cpu.jit import inline, kernel, parallel_kernel
from nerfstudio_pruning.render.cpu.launch import KERNEL_LOCK, TILE_CHUNK, as_float32, as_numpy, launch
from nerfstudio_pruning.render.cpu.projection import GAUSSIANS_PER_CHUNK, projection_jacobian_rows
from nerfstudio_pruning.render.projection import ProjectedGaussians


# Tile-list entries whose gradient moments are held at once: 2^19 x 40 float64 = 160 MB with 3 colour channels.
MOMENT_BATCH_ENTRIES = 1 << 19


def _bin_batches(tile_offsets: np.ndarray, max_entries: int) -> List[Tuple[int, int]]:
    """Consecutive ranges of bins holding at most `max_entries` entries each (a larger bin gets a range alone)."""
    n_bins = tile_offsets.shape[0] - 1
    batches, start = [], 0
    while start < n_bins:
        end = int(np.searchsorted(tile_offsets, tile_offsets[start] + max_entries, side="right")) - 1
        end = min(max(end, start + 1), n_bins)
        batches.append((start, end))
        start = end
    return batches


@torch.no_grad()
def compiled_gradient_moments(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = TILE_SIZE,
    backgrounds: Optional[Tensor] = None,
) -> Tensor:
    """[rows, 21 + 6 D + 1] float64: per projected row, the second moments of the pixel gradients with respect to
    its projected quantities, summed over the pairs it composites, in the compact layout of
    `gradient_moment_tiles` (PUP's M before expansion; `scoring.fisher` explains it).

    One pass over the tile lists the renderer builds; nothing per pair is materialised. Backgrounds: None
    (black), [D] or [C, D].
    """
    bins = bin_tiles(proj, n_cameras, width, height, tile_size)
    colors = as_float32(proj.colors)
    n_chan = colors.shape[1]
    if backgrounds is None:
        bg = no_background(n_cameras, n_chan)
    else:
        bg = as_float32(backgrounds.reshape(-1, n_chan).expand(n_cameras, n_chan))
    n_cols = moment_columns(n_chan)
    out = np.zeros((bins.gauss.shape[0], n_cols), np.float64)
    for bin_start, bin_end in _bin_batches(bins.tile_offsets, MOMENT_BATCH_ENTRIES):
        e0, e1 = int(bins.tile_offsets[bin_start]), int(bins.tile_offsets[bin_end])
        if e1 == e0:
            continue
        entry_moments = np.empty((e1 - e0, n_cols), np.float64)
        launch(gradient_moment_tiles, bins.gauss, colors, *bins.kernel_args(), bg, bin_start, bin_end, e0,
               entry_moments, LANES, chunk=TILE_CHUNK)
        with KERNEL_LOCK:
            add_entries_to_rows(entry_moments, bins.tile_rows, e0, out)
    return torch.from_numpy(out).to(proj.means2d.device)


@torch.no_grad()
def compiled_add_fisher_blocks(moments: Tensor, jac: Tensor, seen: Tensor, total: Tensor) -> None:
    """total[seen] += the symmetric part of jac^T M jac in place, M from the compact `moments` rows of `seen`
    (`compiled_gradient_moments`' layout) and jac [S, 6 + D, B]: one view's Fisher blocks (`scoring.fisher`).
    `total`: a contiguous float64 CPU tensor, `seen`: distinct rows."""
    if not (total.device.type == "cpu" and total.dtype == torch.float64 and total.is_contiguous()):
        raise ValueError("the Fisher total must be a contiguous float64 CPU tensor")
    launch(add_fisher_blocks, as_numpy(moments, torch.float64), as_numpy(jac, torch.float64),
           as_numpy(seen, torch.int64), total.numpy())


@torch.no_grad()
def compiled_projection_jacobian(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor, viewmat: Tensor, K: Tensor,
    width: int, height: int, sh_degree: int, radii: Tensor, rasterize_mode: str = "classic", eps2d: float = EPS2D,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 Jacobians of one camera's projected quantities u = (mean2d 2, conic 3, colour 3, opacity 1) of each
    Gaussian: d u / d means [N, 9, 3], d u / d scales [N, 9, 3], d u / d opacities [N, 9] (before the
    compensation) and d u / d SH degree-0 coefficients [N, 9, 3].

    The vector-Jacobian products of `project_backward` with a cotangent of 1 in each component of u in turn: a
    Gaussian's u depends on its own parameters only, so each returns that row of every Gaussian's Jacobian. One
    kernel computes the nine, sharing each Gaussian's forward pass between them.
    The kernels follow autograd through gsplat's torch projection, clamps included; rows with radii <= 0 (the
    Gaussians this camera does not see) are zero. Settings are the renderer's defaults (near 0.01, eps2d 0.3).
    """
    n = means.shape[0]
    arrays = [as_numpy(t, torch.float64) for t in (means, quats, scales, opacities, sh)]
    viewmats = as_numpy(viewmat.reshape(1, 4, 4), torch.float64)
    ks = as_numpy(K.reshape(1, 3, 3), torch.float64)
    campos = np.ascontiguousarray(np.linalg.inv(viewmats)[:, :3, 3])
    radii_np = radii.detach().to(device="cpu", dtype=torch.int32).reshape(1, n).contiguous().numpy()
    d_means = np.empty((n, 9, 3))
    d_scales = np.empty((n, 9, 3))
    d_opacities = np.empty((n, 9))
    d_sh_dc = np.empty((n, 9, 3))
    launch(projection_jacobian_rows, *arrays, int(sh_degree), campos, viewmats, ks, int(width),
           int(height), float(eps2d), rasterize_mode == "antialiased", radii_np, d_means, d_scales, d_opacities,
           d_sh_dc)
    device = means.device
    return tuple(torch.from_numpy(d).to(device) for d in (d_means, d_scales, d_opacities, d_sh_dc))


# -- kernels -----------------------------------------------------------------------------------------------------


def moment_columns(n_chan: int) -> int:
    """Width of a row of `gradient_moment_tiles`' output: 21 + 6 D + 1 (see there)."""
    return 21 + 6 * n_chan + 1


@inline
def pair_alpha64(gauss, r, x, y):
    """Row r at pixel (x, y) in float64 from the float32 row table, as the torch statistics (`scoring.pair_stats`)
    compute it: (dx, dy) = mean - pixel centre, exp(-sigma) and o exp(-sigma) before the 0.999 clamp."""
    dx = float(gauss[r, G_MX]) - (float(x) + 0.5)
    dy = float(gauss[r, G_MY]) - (float(y) + 0.5)
    c0, c1, c2 = float(gauss[r, G_C0]), float(gauss[r, G_C1]), float(gauss[r, G_C2])
    sigma = 0.5 * (c0 * dx * dx + c2 * dy * dy) + c1 * dx * dy
    vis = math.exp(-sigma)
    return dx, dy, vis, float(gauss[r, G_OPACITY]) * vis


@parallel_kernel
def gradient_moment_tiles(gauss, colors, rects, tile_offsets, tile_rows, width, height, tile_size, tile_w, tile_h,
                          backgrounds, bin_start, bin_end, entry_start, entry_moments, lanes):
    """Second moments of the pixel gradients, per (row, tile) entry, for the tiles bin_start to bin_end - 1.

    For a pair (pixel, row) the channel-c gradient of the pixel with respect to the row's projected quantities
    u = (mean2d 2, conic 3, colour D, opacity) is g_c = beta_c q + w e_c, with q = dalpha/d(mean2d, conic,
    opacity), beta_c = dI_c/dalpha = T c_c - S_c / (1 - alpha), w = T alpha, S what is composited behind the pair
    (background included). entry_moments[e - entry_start] receives, summed over the pixels of e's tile, the
    distinct entries of sum_c g_c g_c^T: q_i q_j sum_c beta_c^2 for i <= j (21, row-major upper triangle), then
    q_i w beta_c (6 x D, i major), then w^2. These are `scoring.fisher._compact_m_contributions`, summed.

    Which pairs are composited is decided by `rasterize_tiles`' walk and step (float32 alpha, float64 product
    of the float32 1 - alpha), so the pairs are `compiled_find_pairs`'; the values are then computed in float64
    from the float32 row table, as the torch statistics (`scoring.pair_stats`) compute them: alpha =
    min(0.999, o exp(-sigma)) in float64, T the float64 product of (1 - alpha), recovered back to front by division.
    """
    n_chan = colors.shape[1]
    n_cols = entry_moments.shape[1]
    col_cross = 21
    for b in prange(bin_start, bin_end):
        e_start = tile_offsets[b]
        e_end = tile_offsets[b + 1]
        if e_start == e_end:
            continue
        cam, txi, tyi, x0, y0, x1, y1 = tile_box(b, tile_w, tile_h, tile_size, width, height)
        tw = x1 - x0
        n_pix = tw * (y1 - y0)
        trans, done, row_done, last = front_to_back_state(n_pix, y1 - y0)  # trans: the rasterizer's T, the cut
        trans64 = np.ones(n_pix, np.float64)  # T from float64 alphas: the values
        cand_p, cand_dx, cand_dy, alpha_buf, vis_buf = candidate_buffers(n_pix, lanes)
        q = np.empty(6, np.float64)
        beta = np.empty(n_chan, np.float64)
        acc = np.empty(n_cols, np.float64)
        n_done = 0
        # Front to back: each pixel's last composited entry and its final float64 T.
        for e in range(e_start, e_end):
            if n_done == n_pix:
                break
            r = tile_rows[e]
            n_cand = open_pixels(gauss, rects, r, x0, y0, x1, y1, done, row_done, cand_p, cand_dx, cand_dy, alpha_buf,
                                 vis_buf, lanes)
            if n_cand == 0:
                continue
            for i in range(n_cand):
                alpha = alpha_buf[i]
                if alpha == 0:
                    continue
                p = cand_p[i]
                if front_to_back(trans, done, row_done, p, alpha, tw) == 0.0:
                    n_done += 1
                    continue
                raw = pair_alpha64(gauss, r, x0 + p % tw, y0 + p // tw)[3]
                trans64[p] *= 1.0 - min(ALPHA_MAX, raw)
                last[p] = e
        # Back to front: S starts as the background seen through the final T.
        behind = np.zeros(n_pix * n_chan, np.float64)
        last_in_tile = e_start - 1
        row_last = np.full(y1 - y0, -1, np.int64)
        for p in range(n_pix):
            last_in_tile = max(last_in_tile, last[p])
            row_last[p // tw] = max(row_last[p // tw], last[p])
            for k in range(n_chan):
                behind[p * n_chan + k] = trans64[p] * float(backgrounds[cam, k])
        for e in range(last_in_tile + 1, e_end):
            for j in range(n_cols):
                entry_moments[e - entry_start, j] = 0.0
        for e in range(last_in_tile, e_start - 1, -1):
            r = tile_rows[e]
            for j in range(n_cols):
                acc[j] = 0.0
            n_cand = pixels_reached(gauss, rects, r, e, x0, y0, x1, y1, last, row_last, cand_p, cand_dx, cand_dy,
                                    alpha_buf, vis_buf, lanes)
            c0 = float(gauss[r, G_C0])
            c1 = float(gauss[r, G_C1])
            c2 = float(gauss[r, G_C2])
            for i in range(n_cand):
                if alpha_buf[i] == 0:
                    continue
                p = cand_p[i]
                dx, dy, vis, raw = pair_alpha64(gauss, r, x0 + p % tw, y0 + p // tw)
                alpha = min(ALPHA_MAX, raw)
                one_minus = 1.0 - alpha
                t_p = trans64[p] / one_minus  # T before this pair
                trans64[p] = t_p
                w = t_p * alpha
                base = p * n_chan
                beta_sq = 0.0
                for k in range(n_chan):
                    ck = float(colors[r, k])
                    beta[k] = t_p * ck - behind[base + k] / one_minus
                    beta_sq += beta[k] * beta[k]
                    behind[base + k] += ck * w
                if raw > ALPHA_MAX:  # on the clamp alpha does not move with mean2d, conic or opacity
                    acc[n_cols - 1] += w * w
                    continue
                q[0] = -alpha * (c0 * dx + c1 * dy)
                q[1] = -alpha * (c1 * dx + c2 * dy)
                q[2] = -alpha * 0.5 * dx * dx
                q[3] = -alpha * dx * dy
                q[4] = -alpha * 0.5 * dy * dy
                q[5] = vis
                j = 0
                for a in range(6):
                    qa = q[a] * beta_sq
                    for bb in range(a, 6):
                        acc[j] += qa * q[bb]
                        j += 1
                for a in range(6):
                    qw = q[a] * w
                    for k in range(n_chan):
                        acc[col_cross + a * n_chan + k] += qw * beta[k]
                acc[n_cols - 1] += w * w
            for j in range(n_cols):
                entry_moments[e - entry_start, j] = acc[j]


@kernel
def add_entries_to_rows(entry_moments, tile_rows, entry_start, out):
    """out[tile_rows[entry_start + i]] += entry_moments[i]: one sequential pass (rows of the same entry list are
    scattered, so threads would share rows; memory order makes one thread fast enough)."""
    n_cols = out.shape[1]
    for i in range(entry_moments.shape[0]):
        r = tile_rows[entry_start + i]
        for col in range(n_cols):
            out[r, col] += entry_moments[i, col]


@parallel_kernel
def add_fisher_blocks(compact, jac, seen, total):
    """total[seen[s]] += the symmetric part of A^T M A, with M [U, U] expanded from row s of `compact` (the
    layout of `gradient_moment_tiles`, U = 6 + D) and A = jac[s] [U, B]: PUP's per-view Fisher block of each
    Gaussian the view composites. `seen` holds distinct Gaussians (one camera, unpacked), so no two iterations
    write the same block."""
    n_seen = seen.shape[0]
    n_u = jac.shape[1]
    n_b = jac.shape[2]
    n_chan = n_u - 6
    n_chunks = (n_seen + GAUSSIANS_PER_CHUNK - 1) // GAUSSIANS_PER_CHUNK
    for chunk in prange(n_chunks):
        m = np.zeros((n_u, n_u))
        ma = np.empty((n_u, n_b))
        slots = np.empty(6, np.int64)
        for i in range(5):
            slots[i] = i
        slots[5] = 5 + n_chan  # the opacity, after the colours
        for s in range(chunk * GAUSSIANS_PER_CHUNK, min(n_seen, (chunk + 1) * GAUSSIANS_PER_CHUNK)):
            k = 0
            for i in range(6):
                for j in range(i, 6):
                    m[slots[i], slots[j]] = compact[s, k]
                    m[slots[j], slots[i]] = compact[s, k]
                    k += 1
            for i in range(6):
                for ch in range(n_chan):
                    value = compact[s, 21 + i * n_chan + ch]
                    m[slots[i], 5 + ch] = value
                    m[5 + ch, slots[i]] = value
            w2 = compact[s, 21 + 6 * n_chan]
            for ch in range(n_chan):
                m[5 + ch, 5 + ch] = w2  # off-diagonal colour entries stay 0 (never written)
            for i in range(n_u):
                for b in range(n_b):
                    acc = 0.0
                    for j in range(n_u):
                        acc += m[i, j] * jac[s, j, b]
                    ma[i, b] = acc
            g = seen[s]
            for a in range(n_b):
                for b in range(a, n_b):
                    ab = 0.0
                    ba = 0.0
                    for i in range(n_u):
                        ab += jac[s, i, a] * ma[i, b]
                        ba += jac[s, i, b] * ma[i, a]
                    value = 0.5 * (ab + ba)
                    total[g, a, b] += value
                    if b != a:
                        total[g, b, a] += value
