"""Compositing kernels of the compiled CPU rasterizer: gsplat 1.4.0's `rasterize_to_pixels_fwd.cu` and
`rasterize_to_pixels_bwd.cu` on numpy arrays, following the rules in `pairs.py`. Differences from the CUDA
kernels, and why:

- Work is split by tile (`prange` over camera x tile), and inside a tile it runs Gaussian by Gaussian (front to
  back in the forward pass, back to front in the backward pass) over the pixels of the Gaussian's candidate
  rectangle, with per-pixel state (transmittance, accumulated colour, done flag) kept in tile-local arrays.
  Each pixel still sees its Gaussians in depth order, so the result is the per-pixel loop of the CUDA kernel;
  what changes is that a CPU core only touches the pixels where a Gaussian can pass the alpha test, instead of
  all 256 pixels of the tile for every Gaussian.
- For each Gaussian in a tile, the pixels still open (not finished, resp. not behind their last pair) are
  listed first, their alphas computed in one branch-free loop that LLVM vectorises (`candidate_alphas`, with
  an exp that is a polynomial instead of a libm call), then composited one by one. Whole tile rows that are
  finished are skipped, and a tile stops when all its pixels are.
- Transmittance is carried in float64 as the product of the float32 (1 - alpha) factors (exact up to double
  rounding). gsplat keeps it in float32; the torch reference sums float32 log1p(-alpha) in float64. The float64
  product lets the backward pass recover T before each pair by division (walking back to front, as gsplat)
  without float32's error growth at T ~ 1e-4, and agrees with the reference to ~1e-6 relative.
- The backward pass writes one gradient row per (row, tile) entry of the tile lists: every entry belongs to one
  tile, so parallel tiles never write the same memory. `reduce_rows` then sums each row's entries, in
  parallel over rows. Memory is O(entries x (8 + channels)), like gsplat's intersection lists.

Everything per pair (sigma, alpha, the tests) is float32 with the operations in the order the reference uses,
so both select the same pairs except where a value lies within float32 rounding of a threshold: exp here is
correctly rounded, torch's is off by one ulp on ~1% of inputs (see `exp_neg_f32` and
docs/compiled_rasterizer.md).

One walk, three passes. The forward pass (`rasterize_tiles`), the backward pass (`backward_tiles`) and PUP's
gradient moments (`scoring/cpu_moments.py`) list a Gaussian's pixels with the same helpers (`open_pixels` front
to back, `pixels_reached` back to front), and the two front-to-back walks take each pair with the same step
(`front_to_back`, on the state `front_to_back_state` makes), so all three composite exactly the same pairs. The
entry loops themselves stay in each kernel, and so do the back-to-front steps: numba would need the per-pair
work passed in as a function, whose kernels it cannot cache; and the backward pass recovers T before a pair
from float32 alphas by multiplying with 1 / (1 - alpha) (gsplat's order of operations), the moments from
float64 alphas by dividing (the torch statistics' order), so one shared step would change float results.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from nerfstudio_pruning.render.constants import ALPHA_MAX_F32, ALPHA_MIN_F32, TRANSMITTANCE_MIN
from nerfstudio_pruning.render.cpu.binning import G_C0, G_C1, G_C2, G_MX, G_MY, G_OPACITY, row_tile_span, tile_box
from nerfstudio_pruning.render.cpu.jit import inline, parallel_kernel

HALF_F32 = np.float32(0.5)  # pixel centres are at (x + 0.5, y + 0.5)

# exp(-sigma) without a call into libm and without branches, so that the alpha loop vectorises: exp(-x) =
# 2^-k exp(r) with k = round(x / ln2), |r| <= ln2/2, exp(r) by its Taylor polynomial of degree 12 (truncation
# < 2e-16) and 2^-k built from its exponent bits, all in float64, rounded once to float32. On every one of the
# 1.09e9 float32 sigma in [0, 6] (alpha >= 1/255 needs sigma <= log(255) = 5.5) the result equals
# float32(exp(float64)), i.e. the correctly rounded value (bench_compiled_rasterizer.py --exp-check); torch's
# float32 exp, which the reference uses, differs from it by 1 ulp on 0.13% of them, libm's expf on 0.007%.
# sigma is clamped to [0, 87] (exp(-87) is still a normal float32), which changes nothing: a pixel with
# sigma > 87 would need opacity > 1e35 to reach alpha 1/255.
_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2
_SIGMA_EXP_MAX = 87.0


@intrinsic
def _float64_from_bits(typingctx, bits):
    """Reinterpret an int64 as the float64 with the same bits (used to build 2^-k from k without a branch)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@inline
def exp_neg_f32(sigma):
    """float32 exp(-sigma) for float32 sigma (correctly rounded; see above)."""
    x = min(max(float(sigma), 0.0), _SIGMA_EXP_MAX)
    k = math.floor(x * _INV_LN2 + 0.5)
    r = k * _LN2 - x
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return np.float32(p * _float64_from_bits((1023 - k) << 52))  # 2^-k: exponent field 1023 - k, k in [0, 126]


# Vector width the alpha loop is padded to. Each (row, tile) entry first lists its candidate pixels (inside its
# box, not yet finished), then evaluates them all in one branch-free loop, then composites them one by one. The
# loop runs over a multiple of LANES lanes (the extra lanes are ignored), because LLVM's vectorised body takes
# 16 float64 lanes at a time and a remainder would run in slow scalar code. The count is passed to the kernels
# at run time: with a compile-time constant LLVM unrolls the loop into scalar code instead.
LANES = 16


@inline
def candidate_alphas(c0, c1, c2, op, dxs, dys, n_lanes, alpha_out, vis_out):
    """alpha and exp(-sigma) of one Gaussian at candidate pixels with offsets (dxs, dys) = mean - pixel centre.

    alpha_out[i] is 0 where gsplat skips the pair (sigma < 0 or alpha < 1/255), else min(0.999, o exp(-sigma));
    all float32, with the reference's order of operations. No branches, so that the loop vectorises; exp's
    float64 polynomial is most of the kernels' arithmetic.
    """
    for i in range(n_lanes):
        dx = dxs[i]
        dy = dys[i]
        sigma = HALF_F32 * (c0 * dx * dx + c2 * dy * dy) + c1 * dx * dy
        vis = exp_neg_f32(sigma)
        alpha = min(ALPHA_MAX_F32, op * vis)
        keep = (sigma >= 0) & (alpha >= ALPHA_MIN_F32)
        alpha_out[i] = alpha if keep else np.float32(0.0)
        vis_out[i] = vis


# Columns of the per-entry and per-row gradient tables (colours follow at GRAD_COLORS, then |d means2d|).
GRAD_MX, GRAD_MY, GRAD_C0, GRAD_C1, GRAD_C2, GRAD_OPACITY, GRAD_COLORS = 0, 1, 2, 3, 4, 5, 6


@inline
def candidate_buffers(n_pix, lanes):
    """A tile's candidate lists (pixel, dx, dy) and the alpha and exp(-sigma) buffers, padded by `lanes` and
    zero-filled: the padding lanes of the vectorised alpha loop must hold finite numbers."""
    n_cap = n_pix + lanes
    return (np.zeros(n_cap, np.int64), np.zeros(n_cap, np.float32), np.zeros(n_cap, np.float32),
            np.zeros(n_cap, np.float32), np.zeros(n_cap, np.float32))


@inline
def open_pixels(gauss, rects, r, x0, y0, x1, y1, done, row_done, cand_p, cand_dx, cand_dy, alpha_buf, vis_buf,
                lanes):
    """Front to back: list the pixels of row r's candidate box in this tile that have not stopped (not `done`;
    scanlines whose pixels have all stopped are skipped whole), with their float32 offsets mean - pixel centre,
    and evaluate their alphas (`candidate_alphas`). Returns how many were listed."""
    mx = gauss[r, G_MX]
    my = gauss[r, G_MY]
    tw = x1 - x0
    bx0 = max(rects[r, 0], x0)
    bx1 = min(rects[r, 1], x1)
    by0 = max(rects[r, 2], y0)
    by1 = min(rects[r, 3], y1)
    n_cand = 0
    for y in range(by0, by1):
        if row_done[y - y0] == tw:
            continue
        dy = my - (np.float32(y) + HALF_F32)
        p_row = (y - y0) * tw - x0
        for x in range(bx0, bx1):
            p = p_row + x
            if done[p]:
                continue
            cand_p[n_cand] = p
            cand_dx[n_cand] = mx - (np.float32(x) + HALF_F32)
            cand_dy[n_cand] = dy
            n_cand += 1
    if n_cand > 0:
        candidate_alphas(gauss[r, G_C0], gauss[r, G_C1], gauss[r, G_C2], gauss[r, G_OPACITY], cand_dx, cand_dy,
                         (n_cand + lanes - 1) // lanes * lanes, alpha_buf, vis_buf)
    return n_cand


@inline
def pixels_reached(gauss, rects, r, e, x0, y0, x1, y1, last, row_last, cand_p, cand_dx, cand_dy, alpha_buf,
                   vis_buf, lanes):
    """Back to front: list the pixels of entry e's (row r's) candidate box in this tile whose last composited entry
    is e or later (scanlines whose last entries all lie in front of e are skipped whole), with their offsets and
    alphas as `open_pixels`. Returns how many were listed."""
    mx = gauss[r, G_MX]
    my = gauss[r, G_MY]
    tw = x1 - x0
    bx0 = max(rects[r, 0], x0)
    bx1 = min(rects[r, 1], x1)
    by0 = max(rects[r, 2], y0)
    by1 = min(rects[r, 3], y1)
    n_cand = 0
    for y in range(by0, by1):
        if e > row_last[y - y0]:
            continue
        dy = my - (np.float32(y) + HALF_F32)
        p_row = (y - y0) * tw - x0
        for x in range(bx0, bx1):
            p = p_row + x
            if e > last[p]:
                continue
            cand_p[n_cand] = p
            cand_dx[n_cand] = mx - (np.float32(x) + HALF_F32)
            cand_dy[n_cand] = dy
            n_cand += 1
    if n_cand > 0:
        candidate_alphas(gauss[r, G_C0], gauss[r, G_C1], gauss[r, G_C2], gauss[r, G_OPACITY], cand_dx, cand_dy,
                         (n_cand + lanes - 1) // lanes * lanes, alpha_buf, vis_buf)
    return n_cand


@inline
def front_to_back_state(n_pix, n_tile_rows):
    """A tile's state for a front-to-back walk: transmittance (1), done flags, done pixels per tile row (a finished
    row is skipped whole) and each pixel's last composited entry (-1: none yet)."""
    return (np.ones(n_pix, np.float64), np.zeros(n_pix, np.uint8), np.zeros(n_tile_rows, np.int64),
            np.full(n_pix, -1, np.int64))


@inline
def front_to_back(trans, done, row_done, p, alpha, tw):
    """Pixel p of a tile `tw` pixels wide takes a pair of float32 `alpha` (> 0), front to back: returns the
    transmittance before the pair and moves trans[p] past it, or returns 0 where the pixel stops instead (T after
    the pair would be <= 1e-4: the pair and everything behind it are excluded, as gsplat's exclusive stop) and
    marks p done (`row_done` counts the done pixels of each tile row). Transmittance before a composited pair is
    > 1e-4, so 0 is never a transmittance. The step the forward pass and the moments share."""
    t_before = trans[p]
    t_after = t_before * (1.0 - float(alpha))
    if t_after <= TRANSMITTANCE_MIN:
        done[p] = 1
        row_done[p // tw] += 1
        return 0.0
    trans[p] = t_after
    return t_before


@parallel_kernel
def rasterize_tiles(gauss, colors, rects, tile_offsets, tile_rows, width, height, tile_size, tile_w, tile_h,
                    backgrounds, has_background, emit_pairs, pair_offsets, pair_pixel, pair_row,
                    out_color, out_transmittance, out_last, out_count, lanes):
    """Forward: composite every tile front to back (rasterize_to_pixels_fwd.cu's per-pixel loop).

    Writes out_color [C, H, W, D] (background added where given), out_transmittance [C, H, W] (float64, T after
    the last pair), out_last [C, H, W] (position in tile_rows of the last pair composited, -1 if none; gsplat's
    `last_ids`) and out_count [C, H, W] (pairs composited). With emit_pairs, also writes each pair's flat pixel
    index and row at pair_offsets[pixel] + k, k-th pair of that pixel front to back (pair_offsets from a
    previous counting run). `lanes` is LANES (see there).
    """
    n_chan = colors.shape[1]
    n_bins = tile_offsets.shape[0] - 1
    hw = height * width
    for b in prange(n_bins):
        cam, txi, tyi, x0, y0, x1, y1 = tile_box(b, tile_w, tile_h, tile_size, width, height)
        tw = x1 - x0
        n_pix = tw * (y1 - y0)
        trans, done, row_done, last = front_to_back_state(n_pix, y1 - y0)
        acc = np.zeros(n_pix * n_chan, np.float64)
        count = np.zeros(n_pix, np.int32)
        cand_p, cand_dx, cand_dy, alpha_buf, vis_buf = candidate_buffers(n_pix, lanes)
        n_done = 0
        for e in range(tile_offsets[b], tile_offsets[b + 1]):
            if n_done == n_pix:  # every pixel of the tile reached T <= 1e-4
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
                t_before = front_to_back(trans, done, row_done, p, alpha, tw)
                if t_before == 0.0:
                    n_done += 1
                    continue
                w = float(alpha) * t_before
                for k in range(n_chan):
                    acc[p * n_chan + k] += w * colors[r, k]
                if emit_pairs:
                    pix = cam * hw + (y0 + p // tw) * width + x0 + p % tw
                    slot = pair_offsets[pix] + count[p]
                    pair_pixel[slot] = pix
                    pair_row[slot] = r
                count[p] += 1
                last[p] = e
        for y in range(y0, y1):
            for x in range(x0, x1):
                p = (y - y0) * tw + (x - x0)
                tp = trans[p]
                for k in range(n_chan):
                    v = acc[p * n_chan + k]
                    if has_background:
                        v += tp * backgrounds[cam, k]
                    out_color[cam, y, x, k] = v
                out_transmittance[cam, y, x] = tp
                out_last[cam, y, x] = last[p]
                out_count[cam, y, x] = count[p]


@parallel_kernel
def backward_tiles(gauss, colors, rects, tile_offsets, tile_rows, width, height, tile_size, tile_w, tile_h,
                   backgrounds, has_background, transmittance, last_ids, v_color, v_alpha, row_offsets, entry_grads,
                   lanes):
    """Backward: per tile, walk each pixel's pairs back to front (rasterize_to_pixels_bwd.cu).

    entry_grads [entries, 8 + D] receives, for each (row, tile) entry, the sum over that tile's pixels of the
    gradients of the row: means2d (2), conic (3), opacity, colours (D), then |d means2d| (2, for absgrad). The
    slot is row_offsets[row] + the tile's index within the row's rectangle, so a row's slots are contiguous.
    Where alpha was clamped at 0.999 the means2d, conic and opacity terms are zero, as in gsplat and the
    reference (clamp_max passes no gradient).
    """
    n_chan = colors.shape[1]
    n_bins = tile_offsets.shape[0] - 1
    n_cols = entry_grads.shape[1]
    col_abs = GRAD_COLORS + n_chan
    for b in prange(n_bins):
        e_start = tile_offsets[b]
        e_end = tile_offsets[b + 1]
        if e_start == e_end:
            continue
        cam, txi, tyi, x0, y0, x1, y1 = tile_box(b, tile_w, tile_h, tile_size, width, height)
        tw = x1 - x0
        n_pix = tw * (y1 - y0)
        trans = np.empty(n_pix, np.float64)
        last = np.empty(n_pix, np.int64)
        alpha_term = np.empty(n_pix, np.float64)
        v_col = np.empty(n_pix * n_chan, np.float64)
        behind = np.zeros(n_pix * n_chan, np.float64)
        grad_col = np.empty(n_chan, np.float64)
        cand_p, cand_dx, cand_dy, alpha_buf, vis_buf = candidate_buffers(n_pix, lanes)
        row_last = np.full(y1 - y0, -1, np.int64)  # last pair of any pixel in each tile row
        last_in_tile = e_start - 1
        for y in range(y0, y1):
            for x in range(x0, x1):
                p = (y - y0) * tw + (x - x0)
                t_final = transmittance[cam, y, x]
                trans[p] = t_final
                last[p] = last_ids[cam, y, x]
                last_in_tile = max(last_in_tile, last[p])
                row_last[y - y0] = max(row_last[y - y0], last[p])
                bg_dot = 0.0
                for k in range(n_chan):
                    vc = float(v_color[cam, y, x, k])
                    v_col[p * n_chan + k] = vc
                    if has_background:
                        bg_dot += float(backgrounds[cam, k]) * vc
                # d(alpha_out)/d(alpha_i) = T_final / (1 - alpha_i) and d(T_final bg)/d(alpha_i) = -T_final bg /
                # (1 - alpha_i): both scale with 1 / (1 - alpha_i), applied per pair below.
                alpha_term[p] = t_final * (float(v_alpha[cam, y, x]) - bg_dot)
        for e in range(last_in_tile + 1, e_end):  # entries behind every pixel's last pair get no gradient
            r = tile_rows[e]
            rtx0, rty0, rntx = row_tile_span(rects, r, tile_size)
            slot = row_offsets[r] + (tyi - rty0) * rntx + (txi - rtx0)
            for j in range(n_cols):
                entry_grads[slot, j] = 0.0
        for e in range(last_in_tile, e_start - 1, -1):
            r = tile_rows[e]
            g_mx = 0.0
            g_my = 0.0
            g_c0 = 0.0
            g_c1 = 0.0
            g_c2 = 0.0
            g_op = 0.0
            g_ax = 0.0
            g_ay = 0.0
            for k in range(n_chan):
                grad_col[k] = 0.0
            c0 = gauss[r, G_C0]
            c1 = gauss[r, G_C1]
            c2 = gauss[r, G_C2]
            op = gauss[r, G_OPACITY]
            n_cand = pixels_reached(gauss, rects, r, e, x0, y0, x1, y1, last, row_last, cand_p, cand_dx, cand_dy,
                                    alpha_buf, vis_buf, lanes)
            for i in range(n_cand):
                alpha = alpha_buf[i]
                if alpha == 0:
                    continue
                p = cand_p[i]
                dx = cand_dx[i]
                dy = cand_dy[i]
                vis = vis_buf[i]
                raw_alpha = op * vis
                one_minus = 1.0 - float(alpha)
                ra = 1.0 / one_minus
                t_p = trans[p] * ra  # T before this pair
                trans[p] = t_p
                fac = float(alpha) * t_p
                v_a = alpha_term[p] * ra
                base = p * n_chan
                for k in range(n_chan):
                    vc = v_col[base + k]
                    ck = float(colors[r, k])
                    grad_col[k] += fac * vc
                    v_a += (ck * t_p - behind[base + k] * ra) * vc
                    behind[base + k] += ck * fac
                if raw_alpha <= ALPHA_MAX_F32:
                    v_sigma = -float(raw_alpha) * v_a
                    fdx = float(dx)
                    fdy = float(dy)
                    g_c0 += 0.5 * v_sigma * fdx * fdx
                    g_c1 += v_sigma * fdx * fdy
                    g_c2 += 0.5 * v_sigma * fdy * fdy
                    gx = v_sigma * (float(c0) * fdx + float(c1) * fdy)
                    gy = v_sigma * (float(c1) * fdx + float(c2) * fdy)
                    g_mx += gx
                    g_my += gy
                    g_ax += abs(gx)
                    g_ay += abs(gy)
                    g_op += float(vis) * v_a
            rtx0, rty0, rntx = row_tile_span(rects, r, tile_size)
            slot = row_offsets[r] + (tyi - rty0) * rntx + (txi - rtx0)
            entry_grads[slot, GRAD_MX] = g_mx
            entry_grads[slot, GRAD_MY] = g_my
            entry_grads[slot, GRAD_C0] = g_c0
            entry_grads[slot, GRAD_C1] = g_c1
            entry_grads[slot, GRAD_C2] = g_c2
            entry_grads[slot, GRAD_OPACITY] = g_op
            for k in range(n_chan):
                entry_grads[slot, GRAD_COLORS + k] = grad_col[k]
            entry_grads[slot, col_abs] = g_ax
            entry_grads[slot, col_abs + 1] = g_ay


@parallel_kernel
def reduce_rows(entry_grads, row_offsets, out):
    """out[r] = sum of row r's slots of entry_grads (contiguous), in float64, in parallel over rows."""
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    for r in prange(n_rows):
        j0 = row_offsets[r]
        j1 = row_offsets[r + 1]
        for c in range(n_cols):
            s = 0.0
            for j in range(j0, j1):
                s += entry_grads[j, c]
            out[r, c] = s
