"""Tile binning of the compiled CPU rasterizer: gsplat 1.4.0's `isect_tiles.cu` and its depth sort, on numpy arrays.

Differences from the CUDA kernels, and why:
- Rows are binned into a tile only where their candidate rectangle (tile rectangle from the 3-sigma radius,
  intersected with the box where alpha can reach 1/255, as `pairs._candidate_pixel_rects` does) touches it.
  Tiles outside that box could not receive a pair from the row, so nothing composited changes.
- Binning fills the tile lists in row order and sorts each list by depth on its own, in parallel, instead of
  one global radix sort of (camera | tile | depth) keys; with a stable sort the order is the same.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from nerfstudio_pruning.render.constants import ALPHA_MIN_F32, ALPHA_MIN_RECIPROCAL
from nerfstudio_pruning.render.cpu.jit import inline, kernel, parallel_kernel

# Columns of `gauss`, the per-row float32 table the compositing kernels read.
G_MX, G_MY, G_C0, G_C1, G_C2, G_OPACITY = 0, 1, 2, 3, 4, 5
GAUSS_COLUMNS = 8  # two unused columns keep rows 32 bytes long

# A pixel with sigma above log(255 * opacity) + SIGMA_CUT_MARGIN cannot reach alpha 1/255 (float32 rounding of
# sigma and exp is ~1e-6 there): the candidate boxes are drawn at that level. They are PIXEL_MARGIN pixels
# wider, plus 1e-6 of the coordinates' size, which covers the float32 rounding of mean - pixel centre (2^-24 of
# it) even on images 1e5 pixels wide.
SIGMA_CUT_MARGIN = 1e-3
PIXEL_MARGIN = 1e-2


@kernel
def _clamped_floor(v, lo, hi):
    # Clamp in floating point before converting: casting an out-of-range float to int is undefined.
    f = math.floor(min(max(v, float(lo)), float(hi)))
    return int(f)


@kernel
def _clamped_ceil(v, lo, hi):
    f = math.ceil(min(max(v, float(lo)), float(hi)))
    return int(f)


@parallel_kernel
def prepare_rows(means2d, conics, opacities, depths, radii, width, height, tile_size, tile_w, tile_h, gauss, rects,
                 n_tiles, not_finite):
    """Per row: the float32 table `gauss`, the candidate pixel rectangle and the number of tiles it touches.

    rects[r] = (x0, x1, y0, y1), half-open, in pixels; empty (and n_tiles[r] = 0) for culled rows (radius <= 0),
    rows whose opacity is under 1/255 (alpha = min(0.999, o exp(-sigma)) <= o when sigma >= 0) and rows off
    the image. not_finite[r] = 1 for a row with radius > 0 and a non-finite mean, conic, opacity or depth; such a
    row is left out here, and `compiled.py` refuses the input.
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
        sigma_cut = math.log(ALPHA_MIN_RECIPROCAL * float(op)) + SIGMA_CUT_MARGIN
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


@inline
def row_tile_span(rects, r, tile_size):
    """First tile column, first tile row and number of tile columns of row r's candidate rectangle."""
    tx0 = rects[r, 0] // tile_size
    ty0 = rects[r, 2] // tile_size
    n_tx = (rects[r, 1] - 1) // tile_size - tx0 + 1
    return tx0, ty0, n_tx


@kernel
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


@parallel_kernel
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


@inline
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
