"""Triton kernels: one program per image tile walks the tile's depth-sorted Gaussians (gsplat's tile lists) and
adds each Gaussian's per-pixel contributions to a score's per-Gaussian statistic.

The walk is gsplat 1.4.0's (`rasterize_to_pixels_fwd.cu`): lanes are the tile's pixels (centres at x + 0.5),
alpha = min(0.999, o exp(-sigma)) in float32, pairs with sigma < 0 or alpha < 1/255 skipped, a pixel stops before
the Gaussian that would take its transmittance to 1e-4 or below. Which pairs composite is decided exactly as the
compiled CPU kernels decide it (`render/cpu/compositing.py`): float32 alpha with a correctly rounded exp, the
transmittance that decides the stop a float64 product of the float32 (1 - alpha). The values are then computed in
`VT` (float64 by default) from the float32 row table, as the per-pair torch statistics compute them
(`scoring/pair_stats.py`): alpha, T, S, and the gradients of docs/methods.md.

Two walks per tile. Front to back: each pixel's final T, the last entry it composites and (leave-one-out only) its
colour I. Back to front from the tile's deepest composited entry: T before each pair by division, S (everything
behind the pair, background included) by accumulation, and the statistic. Per (tile, Gaussian) the lanes'
contributions are summed in VT (`tl.sum`) and added into the float64 per-Gaussian buffer with one atomic per
column: nothing per pair is written to memory. LightGaussian needs only T before each pair, so it is accumulated in
the first walk and the second is skipped.

Statistics (`STAT`): `MOMENTS`, PUP's compact moment row (`scoring.fisher._compact_m_contributions`, the columns
of `scoring/cpu_moments.py: gradient_moment_tiles`: q_i q_j sum_c beta_c^2 for i <= j, then q_i w beta_c, then w^2);
`LEAVE_ONE_OUT`, the exact loss change when the Gaussian alone is removed (`scoring.importance`, `LOSS` selects
l1 / l2 / energy); `TRANSMITTANCE`, the sum of T before each pair (LightGaussian's hits before the opacity and
volume factors, `scoring.baselines`); `SPEEDY`, (o sum_c dI_c/dalpha)^2 (`scoring.speedy`).

`tl.sum`, `tl.max` and `tl.zeros` are themselves `@triton.jit` functions, defined compiled or interpreted once, when
triton is imported; the kernels call `tl.reduce` with the same combine functions and `tl.full` instead, so that a
copy of this module loaded for the interpreter (`fused._load_kernels`) runs on CPU while the process's triton stays
compiled (the interpreter recognises these combine functions and reduces with numpy).

Python float literals meet float64 tensors as float32 in `tl.minimum` (the interpreter shows 0.999 -> 0.99900001),
so the value thresholds are built with `tl.full` in VT.
"""

import triton
import triton.language as tl

# The reductions' combine functions, those of `tl.sum` and `tl.max` (see the module docstring).
_ADD = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max

MOMENTS = tl.constexpr(0)
LEAVE_ONE_OUT = tl.constexpr(1)
TRANSMITTANCE = tl.constexpr(2)
SPEEDY = tl.constexpr(3)

# Entries composited between two checks of whether any pixel of the tile is still live.
ENTRY_BATCH = tl.constexpr(8)

LOSS_L1 = tl.constexpr(0)
LOSS_L2 = tl.constexpr(1)
LOSS_ENERGY = tl.constexpr(2)


@triton.jit
def _decides(mx, my, c0, c1, c2, o, cx, cy):
    """(passes the 1/255 and sigma >= 0 tests, float32 alpha) of one Gaussian at the lanes' float32 centres."""
    dx = mx - cx
    dy = my - cy
    sigma = 0.5 * (c0 * dx * dx + c2 * dy * dy) + c1 * dx * dy
    # exp in float64 rounded once: the correctly rounded float32 exp of the compiled CPU kernels (tl.exp in float32
    # is an approximation on GPUs and would move pairs across the 1/255 test).
    vis = tl.exp((-sigma).to(tl.float64)).to(tl.float32)
    alpha = tl.minimum(o * vis, 0.999)
    return (sigma >= 0) & (alpha >= 1.0 / 255.0), alpha


@triton.jit
def _values(mx, my, c0, c1, c2, o, px, py, alpha_max, VT: tl.constexpr):
    """(dx, dy, exp(-sigma), o exp(-sigma), alpha) in VT from the float32 row, as `pair_stats` computes them."""
    dx = mx.to(VT) - (px.to(VT) + 0.5)
    dy = my.to(VT) - (py.to(VT) + 0.5)
    sigma = 0.5 * (c0.to(VT) * dx * dx + c2.to(VT) * dy * dy) + c1.to(VT) * dx * dy
    vis = tl.exp(-sigma)
    raw = o.to(VT) * vis
    return dx, dy, vis, raw, tl.minimum(raw, alpha_max)


@triton.jit
def _load_entry(entries_ptr, flatten_ids_ptr, e, valid):
    """Row and (mean2d, conic, opacity) of tile-list entry e (nothing is read where `valid` is false). The entry
    table holds each entry's row values at the entry's own position, so that these loads depend on nothing but e
    and can be issued an iteration ahead (a row index loaded first would make them wait for it)."""
    g = tl.load(flatten_ids_ptr + e, mask=valid, other=0).to(tl.int64)  # rows x columns may pass 2^31
    base = entries_ptr + 8 * e.to(tl.int64)
    mx = tl.load(base, mask=valid, other=0.0)
    my = tl.load(base + 1, mask=valid, other=0.0)
    c0 = tl.load(base + 2, mask=valid, other=0.0)
    c1 = tl.load(base + 3, mask=valid, other=0.0)
    c2 = tl.load(base + 4, mask=valid, other=0.0)
    o = tl.load(base + 5, mask=valid, other=0.0)
    return g, mx, my, c0, c1, c2, o


@triton.jit
def _add_moment_rows(row_ptr, qi, q_weighted, w_beta, I: tl.constexpr, D: tl.constexpr, DPAD: tl.constexpr):
    """Row I of the compact moments: columns (I, j) for j = I..5 of the row-major upper triangle (21 entries), then
    the D columns 21 + I D + c."""
    j = tl.arange(0, 8)
    first = I * 6 - (I * (I - 1)) // 2
    block = tl.reduce(qi[:, None] * q_weighted, 0, _ADD).to(tl.float64)
    tl.atomic_add(row_ptr + first + j - I, block, mask=(j >= I) & (j < 6), sem="relaxed")
    ch = tl.arange(0, DPAD)
    cross = tl.reduce(qi[:, None] * w_beta, 0, _ADD).to(tl.float64)
    tl.atomic_add(row_ptr + 21 + I * D + ch, cross, mask=ch < D, sem="relaxed")


@triton.jit
def fused_tile_kernel(
    tile_offsets_ptr,  # [n_tiles + 1] int32: tile t's entries are [offsets[t], offsets[t + 1])
    flatten_ids_ptr,  # [I] int32: the row of each entry, depth-sorted within a tile
    entries_ptr,  # [I, 8] float32: the entry's row's mean2d x, y, conic a, b, c, opacity (effective), 2 unused
    colors_ptr,  # [rows, D] float32
    background_ptr,  # [D] float32
    gt_ptr,  # [H, W, D] float32 (leave-one-out with l1 / l2; unused otherwise)
    out_ptr,  # [rows, n_cols] float64, added into
    n_cols,
    width,
    height,
    tile_w,
    D: tl.constexpr,
    DPAD: tl.constexpr,
    TILE: tl.constexpr,
    STAT: tl.constexpr,
    LOSS: tl.constexpr,
    VT: tl.constexpr,
):
    tile = tl.program_id(0)
    start = tl.load(tile_offsets_ptr + tile)
    end = tl.load(tile_offsets_ptr + tile + 1)
    lane = tl.arange(0, TILE * TILE)
    px = (tile % tile_w) * TILE + lane % TILE
    py = (tile // tile_w) * TILE + lane // TILE
    inside = (px < width) & (py < height)
    cx = px.to(tl.float32) + 0.5
    cy = py.to(tl.float32) + 0.5
    ch = tl.arange(0, DPAD)
    ch_ok = ch < D

    zero_v = tl.full([TILE * TILE], 0.0, VT)
    alpha_max = zero_v + tl.full([TILE * TILE], 0.999, VT)
    t_min = tl.full([TILE * TILE], 1e-4, tl.float64)
    t_decide = tl.full([TILE * TILE], 1.0, tl.float64)  # the stop's transmittance
    t_value = zero_v + 1.0  # T from VT alphas: the values
    alive = inside
    last = tl.full([TILE * TILE], -1, tl.int32)
    colour = tl.full([TILE * TILE, DPAD], 0.0, VT)  # I so far (leave-one-out only)

    e = start
    g, mx, my, c0, c1, c2, o = _load_entry(entries_ptr, flatten_ids_ptr, e, e < end)
    # Front to back until every pixel of the tile has stopped; whether any has not is asked once per batch of
    # entries (a block-wide count costs a barrier). Past the list's end an entry reads as opacity 0: no pair.
    while (e < end) & (tl.reduce(alive.to(tl.int32), 0, _ADD) > 0):
        for _j in range(0, ENTRY_BATCH):
            # The next entry, loaded while this one is composited.
            g_next, mx_next, my_next, c0_next, c1_next, c2_next, o_next = _load_entry(
                entries_ptr, flatten_ids_ptr, e + 1, e + 1 < end)
            passes, alpha32 = _decides(mx, my, c0, c1, c2, o, cx, cy)
            candidate = alive & passes
            if tl.reduce(candidate.to(tl.int32), 0, _ADD) > 0:
                t_after = t_decide * (1.0 - alpha32.to(tl.float64))
                stops = candidate & (t_after <= t_min)
                composites = candidate & (t_after > t_min)
                alive = alive & ~stops
                t_decide = tl.where(composites, t_after, t_decide)
                last = tl.where(composites, e, last)
                _, _, _, _, alpha = _values(mx, my, c0, c1, c2, o, px, py, alpha_max, VT)
                if STAT == TRANSMITTANCE:
                    hits = tl.reduce(tl.where(composites, t_value, zero_v), 0, _ADD).to(tl.float64)
                    tl.atomic_add(out_ptr + g * n_cols, hits, sem="relaxed")
                if STAT == LEAVE_ONE_OUT:
                    c = tl.load(colors_ptr + g * D + ch, mask=ch_ok, other=0.0).to(VT)
                    w = tl.where(composites, t_value * alpha, zero_v)
                    colour += w[:, None] * c[None, :]
                t_value = tl.where(composites, t_value * (1.0 - alpha), t_value)
            g, mx, my, c0, c1, c2, o = g_next, mx_next, my_next, c0_next, c1_next, c2_next, o_next
            e += 1

    if STAT != TRANSMITTANCE:
        bg = tl.load(background_ptr + ch, mask=ch_ok, other=0.0).to(VT)
        behind = t_value[:, None] * bg[None, :]  # S behind the last composited pair: the background seen through T
        if STAT == LEAVE_ONE_OUT:
            if LOSS != LOSS_ENERGY:  # (the energy form reads no image: gt_ptr then points at no H x W x D buffer)
                pixel = (py * width + px) * D
                gt_mask = inside[:, None] & ch_ok[None, :]
                # r = I - I_gt, fixed while one Gaussian is removed
                gt = tl.load(gt_ptr + pixel[:, None] + ch[None, :], mask=gt_mask, other=0.0).to(VT)
                residual = tl.where(gt_mask, colour + behind - gt, 0.0)
        deepest = tl.reduce(tl.where(inside, last, -1), 0, _MAX)
        col8 = tl.arange(0, 8)
        # Back to front over the entries some pixel composites, the previous entry loaded an iteration ahead.
        g, mx, my, c0, c1, c2, o = _load_entry(entries_ptr, flatten_ids_ptr, deepest, deepest >= start)
        for k in range(0, deepest - start + 1):
            e = deepest - k
            g_next, mx_next, my_next, c0_next, c1_next, c2_next, o_next = _load_entry(
                entries_ptr, flatten_ids_ptr, e - 1, e - 1 >= start)
            reached = inside & (last >= e)
            passes, _ = _decides(mx, my, c0, c1, c2, o, cx, cy)
            pair = reached & passes
            if tl.reduce(pair.to(tl.int32), 0, _ADD) > 0:
                dx, dy, vis, raw, alpha = _values(mx, my, c0, c1, c2, o, px, py, alpha_max, VT)
                one_minus = 1.0 - alpha
                t_before = tl.where(pair, t_value / one_minus, t_value)
                t_value = t_before
                w = tl.where(pair, t_before * alpha, zero_v)
                c = tl.load(colors_ptr + g * D + ch, mask=ch_ok, other=0.0).to(VT)
                # dI_c/dalpha = T c_c - S_c / (1 - alpha)
                beta = tl.where(pair[:, None], t_before[:, None] * c[None, :] - behind / one_minus[:, None], 0.0)
                behind += w[:, None] * c[None, :]
                row_ptr = out_ptr + g * n_cols
                if STAT == MOMENTS:
                    active = pair & (raw <= alpha_max)  # on the clamp alpha does not move with u
                    q0 = tl.where(active, -alpha * (c0.to(VT) * dx + c1.to(VT) * dy), zero_v)
                    q1 = tl.where(active, -alpha * (c1.to(VT) * dx + c2.to(VT) * dy), zero_v)
                    q2 = tl.where(active, -alpha * 0.5 * dx * dx, zero_v)
                    q3 = tl.where(active, -alpha * dx * dy, zero_v)
                    q4 = tl.where(active, -alpha * 0.5 * dy * dy, zero_v)
                    q5 = tl.where(active, vis, zero_v)
                    q = tl.where(col8[None, :] == 0, q0[:, None], tl.where(col8[None, :] == 1, q1[:, None],
                        tl.where(col8[None, :] == 2, q2[:, None], tl.where(col8[None, :] == 3, q3[:, None],
                        tl.where(col8[None, :] == 4, q4[:, None], tl.where(col8[None, :] == 5, q5[:, None], 0.0))))))
                    q_weighted = q * tl.reduce(beta * beta, 1, _ADD)[:, None]
                    w_beta = w[:, None] * beta
                    # Row by row (a [lanes, 8, 8] product would spill registers on a GPU): columns (i, j >= i) of
                    # the 6 x 6 alpha block, sums over lanes of q_i q_j sum_c beta_c^2, then q_i w beta_c.
                    _add_moment_rows(row_ptr, q0, q_weighted, w_beta, 0, D, DPAD)
                    _add_moment_rows(row_ptr, q1, q_weighted, w_beta, 1, D, DPAD)
                    _add_moment_rows(row_ptr, q2, q_weighted, w_beta, 2, D, DPAD)
                    _add_moment_rows(row_ptr, q3, q_weighted, w_beta, 3, D, DPAD)
                    _add_moment_rows(row_ptr, q4, q_weighted, w_beta, 4, D, DPAD)
                    _add_moment_rows(row_ptr, q5, q_weighted, w_beta, 5, D, DPAD)
                    tl.atomic_add(row_ptr + 21 + 6 * D, tl.reduce(w * w, 0, _ADD).to(tl.float64), sem="relaxed")
                if STAT == LEAVE_ONE_OUT:
                    delta = -alpha[:, None] * beta  # the pixel's exact change when this Gaussian alone goes
                    if LOSS == LOSS_L1:
                        change = tl.abs(residual + delta) - tl.abs(residual)
                    elif LOSS == LOSS_L2:
                        change = delta * (2.0 * residual + delta)
                    else:
                        change = delta * delta
                    total = tl.reduce(tl.reduce(tl.where(pair[:, None], change, 0.0), 1, _ADD), 0, _ADD)
                    tl.atomic_add(row_ptr, total.to(tl.float64), sem="relaxed")
                if STAT == SPEEDY:
                    footprint = o.to(VT) * tl.reduce(beta, 1, _ADD)
                    total = tl.reduce(tl.where(pair, footprint * footprint, zero_v), 0, _ADD)
                    tl.atomic_add(row_ptr, total.to(tl.float64), sem="relaxed")
            g, mx, my, c0, c1, c2, o = g_next, mx_next, my_next, c0_next, c1_next, c2_next, o_next
