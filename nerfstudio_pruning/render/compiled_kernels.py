"""Numba kernels of the compiled CPU rasterizer: tile binning, forward compositing, backward, gradient reduction.

These follow gsplat 1.4.0's CUDA kernels (`isect_tiles.cu`, `rasterize_to_pixels_fwd.cu`,
`rasterize_to_pixels_bwd.cu`) and the rules in `pairs.py`, on numpy arrays; the torch side (autograd, checks,
threads) is `compiled.py`. Differences from the CUDA kernels, and why:

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
- Rows are binned into a tile only where their candidate rectangle (tile rectangle from the 3-sigma radius,
  intersected with the box where alpha can reach 1/255, as `pairs._candidate_pixel_rects` does) touches it.
  Tiles outside that box could not receive a pair from the row, so nothing composited changes.
- Transmittance is carried in float64 as the product of the float32 (1 - alpha) factors (exact up to double
  rounding). gsplat keeps it in float32; the torch reference sums float32 log1p(-alpha) in float64. The float64
  product lets the backward pass recover T before each pair by division (walking back to front, as gsplat)
  without float32's error growth at T ~ 1e-4, and agrees with the reference to ~1e-6 relative.
- The backward pass writes one gradient row per (row, tile) entry of the tile lists: every entry belongs to one
  tile, so parallel tiles never write the same memory. `reduce_rows` then sums each row's entries, in
  parallel over rows. Memory is O(entries x (8 + channels)), like gsplat's intersection lists.
- Binning fills the tile lists in row order and sorts each list by depth on its own, in parallel, instead of
  one global radix sort of (camera | tile | depth) keys; with a stable sort the order is the same.

Everything per pair (sigma, alpha, the tests) is float32 with the operations in the order the reference uses,
so both select the same pairs except where a value lies within float32 rounding of a threshold: exp here is
correctly rounded, torch's is off by one ulp on ~1% of inputs (see `exp_neg_f32` and
docs/compiled_rasterizer.md).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from nerfstudio_pruning.render.projection_kernels import GAUSSIANS_PER_CHUNK

# Thresholds as float32, because the reference compares float32 tensors with Python scalars in float32.
ALPHA_MAX_F32 = np.float32(0.999)
ALPHA_MIN_F32 = np.float32(1.0 / 255.0)
HALF_F32 = np.float32(0.5)
TRANSMITTANCE_MIN = 1e-4
# A pixel with sigma above log(255 * opacity) + SIGMA_CUT_MARGIN cannot reach alpha 1/255 (float32 rounding of
# sigma and exp is ~1e-6 there): the candidate boxes are drawn at that level. They are PIXEL_MARGIN pixels
# wider, plus 1e-6 of the coordinates' size, which covers the float32 rounding of mean - pixel centre (2^-24 of
# it) even on images 1e5 pixels wide.
SIGMA_CUT_MARGIN = 1e-3
PIXEL_MARGIN = 1e-2

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


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, inline="always", error_model="numpy")
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


# Columns of `gauss`, the per-row float32 table the compositing kernels read.
G_MX, G_MY, G_C0, G_C1, G_C2, G_OPACITY = 0, 1, 2, 3, 4, 5
GAUSS_COLUMNS = 8  # two unused columns keep rows 32 bytes long

# Columns of the per-entry and per-row gradient tables (colours follow at GRAD_COLORS, then |d means2d|).
GRAD_MX, GRAD_MY, GRAD_C0, GRAD_C1, GRAD_C2, GRAD_OPACITY, GRAD_COLORS = 0, 1, 2, 3, 4, 5, 6


@njit(cache=True, error_model="numpy")
def _clamped_floor(v, lo, hi):
    # Clamp in floating point before converting: casting an out-of-range float to int is undefined.
    f = math.floor(min(max(v, float(lo)), float(hi)))
    return int(f)


@njit(cache=True, error_model="numpy")
def _clamped_ceil(v, lo, hi):
    f = math.ceil(min(max(v, float(lo)), float(hi)))
    return int(f)


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
def prepare_rows(means2d, conics, opacities, depths, radii, width, height, tile_size, tile_w, tile_h, gauss, rects,
                 n_tiles, not_finite):
    """Per row: the float32 table `gauss`, the candidate pixel rectangle and the number of tiles it touches.

    rects[r] = (x0, x1, y0, y1), half-open, in pixels; empty (and n_tiles[r] = 0) for culled rows (radius <= 0),
    rows whose opacity is under 1/255 (alpha = min(0.999, o exp(-sigma)) <= o when sigma >= 0) and rows off
    the image. not_finite[r] = 1 for a row with radius > 0 and a non-finite mean, conic, opacity or depth; such a
    row is left out here, and compiled.py refuses the input.
    """
    n_rows = means2d.shape[0]
    ts_f32 = np.float32(tile_size)
    for r in prange(n_rows):
        mx = means2d[r, 0]
        my = means2d[r, 1]
        c0 = conics[r, 0]
        c1 = conics[r, 1]
        c2 = conics[r, 2]
        op = opacities[r]
        gauss[r, G_MX] = mx
        gauss[r, G_MY] = my
        gauss[r, G_C0] = c0
        gauss[r, G_C1] = c1
        gauss[r, G_C2] = c2
        gauss[r, G_OPACITY] = op
        gauss[r, 6] = np.float32(0.0)
        gauss[r, 7] = np.float32(0.0)
        rects[r, 0] = 0
        rects[r, 1] = 0
        rects[r, 2] = 0
        rects[r, 3] = 0
        n_tiles[r] = 0
        finite = (np.isfinite(mx) and np.isfinite(my) and np.isfinite(c0) and np.isfinite(c1)
                  and np.isfinite(c2) and np.isfinite(op) and np.isfinite(depths[r]))
        not_finite[r] = 1 if radii[r] > 0 and not finite else 0
        if radii[r] <= 0 or not finite or op < ALPHA_MIN_F32:
            continue
        # gsplat's tile rectangle (isect_tiles.cu), in float32 as there and in the reference.
        tile_r = np.float32(radii[r]) / ts_f32
        tx = mx / ts_f32
        ty = my / ts_f32
        tx0 = _clamped_floor(tx - tile_r, 0, tile_w)
        tx1 = _clamped_ceil(tx + tile_r, 0, tile_w)
        ty0 = _clamped_floor(ty - tile_r, 0, tile_h)
        ty1 = _clamped_ceil(ty + tile_r, 0, tile_h)
        x0 = tx0 * tile_size
        x1 = tx1 * tile_size
        y0 = ty0 * tile_size
        y1 = ty1 * tile_size
        # Box where sigma <= log(255 o) + SIGMA_CUT_MARGIN: outside it alpha stays under 1/255. Pixel x is in
        # when its centre x + 0.5 lies within mean +- extent; PIXEL_MARGIN absorbs float32 rounding of dx.
        sigma_cut = math.log(255.0 * float(op)) + SIGMA_CUT_MARGIN
        det = float(c0) * float(c2) - float(c1) * float(c1)
        if det > 0.0 and c0 > 0 and c2 > 0:
            level = 2.0 * max(sigma_cut, 0.0)
            margin = PIXEL_MARGIN + 1e-6 * (abs(float(mx)) + abs(float(my)) + width + height)
            ext_x = math.sqrt(level * float(c2) / det) + margin
            ext_y = math.sqrt(level * float(c0) / det) + margin
            x0 = max(x0, _clamped_ceil(float(mx) - ext_x - 0.5, -2, width + 2))
            x1 = min(x1, _clamped_floor(float(mx) + ext_x - 0.5, -2, width + 2) + 1)
            y0 = max(y0, _clamped_ceil(float(my) - ext_y - 0.5, -2, height + 2))
            y1 = min(y1, _clamped_floor(float(my) + ext_y - 0.5, -2, height + 2) + 1)
        # (a conic that is not positive definite keeps the whole tile rectangle: sigma < 0 pixels are skipped)
        x0 = max(x0, 0)
        y0 = max(y0, 0)
        x1 = min(x1, width)
        y1 = min(y1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        rects[r, 0] = x0
        rects[r, 1] = x1
        rects[r, 2] = y0
        rects[r, 3] = y1
        n_tiles[r] = ((x1 - 1) // tile_size - x0 // tile_size + 1) * ((y1 - 1) // tile_size - y0 // tile_size + 1)


ROW_KEY_BITS = 31  # rows are < 2^31 (int32 tile lists)
ROW_KEY_MASK = (1 << ROW_KEY_BITS) - 1


def depth_sort_keys(depths: np.ndarray) -> np.ndarray:
    """int64 keys ordering rows by float32 depth, then by row index: (monotone int of the depth) << 31 | row.

    The int32 bit pattern of a float orders non-negative floats; negative ones are mapped to minus their
    magnitude bits, so every finite depth (and -0 == +0) sorts as a float compare does.
    """
    bits = depths.astype(np.float32).view(np.int32).astype(np.int64)
    monotone = np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)) + 2**31  # in [1, 2^32)
    return (monotone << ROW_KEY_BITS) | np.arange(depths.shape[0], dtype=np.int64)


@njit(cache=True, inline="always", error_model="numpy")
def row_tile_span(rects, r, tile_size):
    """First tile column, first tile row and number of tile columns of row r's candidate rectangle."""
    tx0 = rects[r, 0] // tile_size
    ty0 = rects[r, 2] // tile_size
    n_tx = (rects[r, 1] - 1) // tile_size - tx0 + 1
    return tx0, ty0, n_tx


@njit(cache=True, fastmath=False, error_model="numpy")
def bin_rows(rects, n_tiles, camera_ids, tile_size, tile_w, tile_h, n_cameras, tile_offsets, tile_rows, row_offsets):
    """Per (camera, tile) lists of rows, in row order (`sort_tiles` then orders them by depth).

    Outputs: tile_offsets [C * tiles + 1] (CSR over tiles), tile_rows [entries], and row_offsets [rows + 1]: row
    r's entries, one per tile of its rectangle in row-major tile order, are slots row_offsets[r] ... of the
    per-entry gradient table. Serial: two passes of O(entries) (~1 ms per 100k entries); the writes of
    parallel rows would collide on the tiles' cursors.
    """
    tiles_per_cam = tile_w * tile_h
    n_bins = n_cameras * tiles_per_cam
    n_rows = rects.shape[0]
    counts = np.zeros(n_bins, np.int64)
    row_offsets[0] = 0
    for r in range(n_rows):
        row_offsets[r + 1] = row_offsets[r] + n_tiles[r]
        if n_tiles[r] == 0:
            continue
        base = camera_ids[r] * tiles_per_cam
        for ty in range(rects[r, 2] // tile_size, (rects[r, 3] - 1) // tile_size + 1):
            for tx in range(rects[r, 0] // tile_size, (rects[r, 1] - 1) // tile_size + 1):
                counts[base + ty * tile_w + tx] += 1
    tile_offsets[0] = 0
    for b in range(n_bins):
        tile_offsets[b + 1] = tile_offsets[b] + counts[b]
    cursor = tile_offsets[:-1].copy()
    for r in range(n_rows):
        if n_tiles[r] == 0:
            continue
        base = camera_ids[r] * tiles_per_cam
        for ty in range(rects[r, 2] // tile_size, (rects[r, 3] - 1) // tile_size + 1):
            for tx in range(rects[r, 0] // tile_size, (rects[r, 1] - 1) // tile_size + 1):
                b = base + ty * tile_w + tx
                tile_rows[cursor[b]] = r
                cursor[b] += 1


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
def sort_tiles(row_keys, tile_offsets, tile_rows):
    """Sort every tile's list front to back, in parallel over tiles.

    row_keys[r] (from `depth_sort_keys`) orders rows by depth and then by row index, as gsplat's radix sort of
    (camera | tile | depth) keys and the reference's stable argsort do; keys are unique, so any sort will do.
    """
    n_bins = tile_offsets.shape[0] - 1
    for b in prange(n_bins):
        e0 = tile_offsets[b]
        e1 = tile_offsets[b + 1]
        if e1 - e0 < 2:
            continue
        keys = np.empty(e1 - e0, np.int64)
        for i in range(e1 - e0):
            keys[i] = row_keys[tile_rows[e0 + i]]
        keys.sort()
        for i in range(e1 - e0):
            tile_rows[e0 + i] = keys[i] & ROW_KEY_MASK


@njit(cache=True, inline="always", error_model="numpy")
def tile_box(b, tile_w, tile_h, tile_size, width, height):
    """Bin b = camera x tile: (camera, tile column, tile row, x0, y0, x1, y1), the tile's pixels [x0, x1) x [y0, y1)."""
    tiles_per_cam = tile_w * tile_h
    cam = b // tiles_per_cam
    t = b - cam * tiles_per_cam
    tyi = t // tile_w
    txi = t - tyi * tile_w
    x0 = txi * tile_size
    y0 = tyi * tile_size
    return cam, txi, tyi, x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height)


@njit(cache=True, inline="always", error_model="numpy")
def candidate_buffers(n_pix, lanes):
    """A tile's candidate lists (pixel, dx, dy) and the alpha and exp(-sigma) buffers, padded by `lanes` and
    zero-filled: the padding lanes of the vectorised alpha loop must hold finite numbers."""
    n_cap = n_pix + lanes
    return (np.zeros(n_cap, np.int64), np.zeros(n_cap, np.float32), np.zeros(n_cap, np.float32),
            np.zeros(n_cap, np.float32), np.zeros(n_cap, np.float32))


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, inline="always", error_model="numpy")
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


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
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
        trans = np.ones(n_pix, np.float64)
        acc = np.zeros(n_pix * n_chan, np.float64)
        done = np.zeros(n_pix, np.uint8)
        count = np.zeros(n_pix, np.int32)
        last = np.full(n_pix, -1, np.int64)
        row_done = np.zeros(y1 - y0, np.int64)  # pixels done per tile row: a finished row is skipped whole
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
                t_before = trans[p]
                t_after = t_before * (1.0 - float(alpha))
                if t_after <= TRANSMITTANCE_MIN:  # exclusive stop, as gsplat: this pair is not composited
                    done[p] = 1
                    n_done += 1
                    row_done[p // tw] += 1
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
                trans[p] = t_after
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


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
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


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
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


def moment_columns(n_chan: int) -> int:
    """Width of a row of `gradient_moment_tiles`' output: 21 + 6 D + 1 (see there)."""
    return 21 + 6 * n_chan + 1


@njit(cache=True, inline="always", error_model="numpy")
def pair_alpha64(gauss, r, x, y):
    """Row r at pixel (x, y) in float64 from the float32 row table, as the torch statistics (`scoring.pair_stats`)
    compute it: (dx, dy) = mean - pixel centre, exp(-sigma) and o exp(-sigma) before the 0.999 clamp."""
    dx = float(gauss[r, G_MX]) - (float(x) + 0.5)
    dy = float(gauss[r, G_MY]) - (float(y) + 0.5)
    c0, c1, c2 = float(gauss[r, G_C0]), float(gauss[r, G_C1]), float(gauss[r, G_C2])
    sigma = 0.5 * (c0 * dx * dx + c2 * dy * dy) + c1 * dx * dy
    vis = math.exp(-sigma)
    return dx, dy, vis, float(gauss[r, G_OPACITY]) * vis


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
def gradient_moment_tiles(gauss, colors, rects, tile_offsets, tile_rows, width, height, tile_size, tile_w, tile_h,
                          backgrounds, bin_start, bin_end, entry_start, entry_moments, lanes):
    """Second moments of the pixel gradients, per (row, tile) entry, for the tiles bin_start to bin_end - 1.

    For a pair (pixel, row) the channel-c gradient of the pixel with respect to the row's projected quantities
    u = (mean2d 2, conic 3, colour D, opacity) is g_c = beta_c q + w e_c, with q = dalpha/d(mean2d, conic,
    opacity), beta_c = dI_c/dalpha = T c_c - S_c / (1 - alpha), w = T alpha, S what is composited behind the pair
    (background included). entry_moments[e - entry_start] receives, summed over the pixels of e's tile, the
    distinct entries of sum_c g_c g_c^T: q_i q_j sum_c beta_c^2 for i <= j (21, row-major upper triangle), then
    q_i w beta_c (6 x D, i major), then w^2. These are `scoring.fisher._compact_m_contributions`, summed.

    Which pairs are composited is decided exactly as `rasterize_tiles` decides it (float32 alpha, float64 product
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
        trans = np.ones(n_pix, np.float64)  # the rasterizer's T: decides the cut
        trans64 = np.ones(n_pix, np.float64)  # T from float64 alphas: the values
        done = np.zeros(n_pix, np.uint8)
        last = np.full(n_pix, -1, np.int64)
        row_done = np.zeros(y1 - y0, np.int64)
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
                t_after = trans[p] * (1.0 - float(alpha))
                if t_after <= TRANSMITTANCE_MIN:
                    done[p] = 1
                    n_done += 1
                    row_done[p // tw] += 1
                    continue
                raw = pair_alpha64(gauss, r, x0 + p % tw, y0 + p // tw)[3]
                trans64[p] *= 1.0 - min(0.999, raw)
                trans[p] = t_after
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
                alpha = min(0.999, raw)
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
                if raw > 0.999:  # on the clamp alpha does not move with mean2d, conic or opacity
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


@njit(cache=True, fastmath=False, error_model="numpy")
def add_entries_to_rows(entry_moments, tile_rows, entry_start, out):
    """out[tile_rows[entry_start + i]] += entry_moments[i]: one sequential pass (rows of the same entry list are
    scattered, so threads would share rows; memory order makes one thread fast enough)."""
    n_cols = out.shape[1]
    for i in range(entry_moments.shape[0]):
        r = tile_rows[entry_start + i]
        for col in range(n_cols):
            out[r, col] += entry_moments[i, col]


@njit(cache=True, parallel=True, fastmath=False, error_model="numpy")
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
