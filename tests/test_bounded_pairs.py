"""Pair enumeration in bounded batches: the same pairs as before, on both paths, without holding the candidates
behind the early stop.

- The torch path against the unbatched enumeration it replaced (kept below as the reference) and against a
  dense per-pixel brute force, on random scenes and on deep ones (hundreds of layers per pixel), with batches
  small enough to split pixels and Gaussians across many of them.
- The gsplat (CUDA) path's driver, run on CPU with a torch stand-in for gsplat's three kernels written from
  their CUDA sources (`EmulatedGsplatKernels`): the same pairs, with call budgets small enough to split tile
  rows and depth batches. The stand-in itself is checked against brute force, and used to show why the stop
  flag must be carried: gsplat's own depth-batched loop carries only the transmittance and takes pairs a
  stopped pixel must not.
- Peak memory, measured by torch's CPU allocator (profiler memory events): flat in depth for the batched
  enumeration, linear in depth for the unbatched one.
"""

from __future__ import annotations

import math

import pytest
import torch

from nerfstudio_pruning.render.constants import ALPHA_MAX, ALPHA_MIN, MAX_PAIRS_PER_PIXEL, TRANSMITTANCE_MIN
from nerfstudio_pruning.render.pairs import (
    EnumerationStats,
    Pairs,
    _candidate_pixel_rects,
    _pair_alpha,
    cumsum_first_dim,
    find_pairs,
    find_pairs_with_tile_kernels,
    segment_ends,
    segment_starts,
    segmented_cumsum,
)
from nerfstudio_pruning.render.projection import ProjectedGaussians, pack, project
from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

pytestmark = pytest.mark.usefixtures("single_thread")


# -- references ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def unbounded_find_pairs(proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = 16) -> Pairs:
    """`find_pairs` as it was before batching (commit d088a46): every candidate above 1/255 of the view at once,
    sorted, then cut at T <= 1e-4. Kept as the reference for "the same pairs" and for its memory."""
    visible = torch.nonzero(proj.radii > 0).squeeze(1)
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
    while start < visible.shape[0]:
        base = ends[start - 1] if start > 0 else ends.new_zeros(())
        stop = max(int(torch.searchsorted(ends, base + (1 << 21), right=True)), start + 1)
        cnt = counts[start:stop]
        total = int(cnt.sum())
        if total > 0:
            local = torch.repeat_interleave(torch.arange(stop - start), cnt)
            offset = torch.arange(total) - (torch.cumsum(cnt, 0) - cnt)[local]
            w = rect_w[start:stop][local]
            px = rects[start:stop, 0][local] + offset % w
            py = rects[start:stop, 2][local] + offset // w
            row = visible[start:stop][local]
            dx = proj.means2d[row, 0] - (px.to(proj.means2d.dtype) + 0.5)
            dy = proj.means2d[row, 1] - (py.to(proj.means2d.dtype) + 0.5)
            sigma, alpha = _pair_alpha(dx, dy, proj.conics[row], proj.opacities[row])
            keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
            pixels.append((proj.camera_ids[row] * (height * width) + py * width + px)[keep])
            rows.append(row[keep])
            alphas.append(alpha[keep])
        start = stop
    if not pixels:
        empty = torch.zeros(0, dtype=torch.long)
        return Pairs(empty, empty.clone())
    pixel, row, alpha = torch.cat(pixels), torch.cat(rows), torch.cat(alphas)
    order = torch.argsort(pixel, stable=True)
    pixel, row, alpha = pixel[order], row[order], alpha[order]
    log_t_after = segmented_cumsum(torch.log1p(-alpha), segment_starts(pixel), exclusive=False)
    keep = log_t_after > math.log(TRANSMITTANCE_MIN)
    return Pairs(pixel[keep], row[keep])


@torch.no_grad()
def brute_force_pairs(proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int) -> Pairs:
    """Every pixel against every row (dense), gsplat's rules applied literally: tiles touched by the radius,
    sigma >= 0, alpha >= 1/255, depth order (ties by row), stop before T after <= 1e-4 (float64 log)."""
    n_rows = proj.means2d.shape[0]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    px, py = xs.reshape(-1), ys.reshape(-1)
    order = torch.argsort(proj.depths, stable=True)
    order = order[proj.radii[order] > 0]
    tile_r = proj.radii[order].to(proj.means2d.dtype) / tile_size
    m = proj.means2d[order]
    tx0 = torch.floor(m[:, 0] / tile_size - tile_r).clamp_min(0)
    tx1 = torch.ceil(m[:, 0] / tile_size + tile_r)
    ty0 = torch.floor(m[:, 1] / tile_size - tile_r).clamp_min(0)
    ty1 = torch.ceil(m[:, 1] / tile_size + tile_r)
    in_tiles = ((px // tile_size)[:, None] >= tx0) & ((px // tile_size)[:, None] < tx1) & (
        (py // tile_size)[:, None] >= ty0) & ((py // tile_size)[:, None] < ty1)
    dx = m[None, :, 0] - (px[:, None].to(m.dtype) + 0.5)
    dy = m[None, :, 1] - (py[:, None].to(m.dtype) + 0.5)
    conic = proj.conics[order]
    sigma = 0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) + conic[:, 1] * dx * dy
    alpha = torch.clamp_max(proj.opacities[order] * torch.exp(-sigma), ALPHA_MAX)
    same_camera = proj.camera_ids[order][None, :] == torch.arange(n_cameras)[:, None]  # [C, rows]
    pixels, rows = [], []
    for camera in range(n_cameras):
        valid = in_tiles & same_camera[camera][None, :] & (sigma >= 0) & (alpha >= ALPHA_MIN)
        log_after = torch.cumsum(torch.where(valid, torch.log1p(-alpha.double()), 0.0), dim=1)
        keep = valid & (log_after > math.log(TRANSMITTANCE_MIN))
        pixel_index, k = torch.nonzero(keep, as_tuple=True)
        pixels.append(camera * width * height + pixel_index)
        rows.append(order[k])
    pixel, row = torch.cat(pixels), torch.cat(rows)
    by_pixel = torch.argsort(pixel, stable=True)
    assert n_rows >= 0
    return Pairs(pixel[by_pixel], row[by_pixel])


class EmulatedGsplatKernels:
    """gsplat 1.4.0's `isect_tiles`, `isect_offset_encode` and `rasterize_to_indices_in_range` in torch, from
    their CUDA sources (`isect_tiles.cu`, `rasterize_to_indices_in_range.cu`): same arguments, same results in
    the same order. Slow; for small scenes only."""

    @staticmethod
    def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, sort=True, packed=False):
        assert not packed and sort
        n_cameras, n = radii.shape
        tile_radius = radii.float() / tile_size
        tile_x, tile_y = means2d[..., 0] / tile_size, means2d[..., 1] / tile_size
        # (uint32_t)floor(negative) saturates at 0 on the GPU; then min(max(0, .), tile_width).
        x0 = torch.floor(tile_x - tile_radius).clamp(0, tile_width).long()
        x1 = torch.ceil(tile_x + tile_radius).clamp(0, tile_width).long()
        y0 = torch.floor(tile_y - tile_radius).clamp(0, tile_height).long()
        y1 = torch.ceil(tile_y + tile_radius).clamp(0, tile_height).long()
        tiles_per_gauss = ((x1 - x0) * (y1 - y0) * (radii > 0)).reshape(-1)
        flat = torch.repeat_interleave(torch.arange(n_cameras * n), tiles_per_gauss)
        within = torch.arange(flat.shape[0]) - (torch.cumsum(tiles_per_gauss, 0) - tiles_per_gauss)[flat]
        width_in_tiles = (x1 - x0).reshape(-1)[flat]
        tile = (y0.reshape(-1)[flat] + within // width_in_tiles) * tile_width + x0.reshape(-1)[flat] + within % width_in_tiles
        tile_n_bits = (tile_width * tile_height).bit_length()
        depth_bits = depths.float().contiguous().view(torch.int32).reshape(-1)[flat].long()
        isect_ids = ((flat // n) << (32 + tile_n_bits)) | (tile << 32) | depth_bits
        order = torch.argsort(isect_ids, stable=True)  # cub's radix sort is stable
        return tiles_per_gauss.reshape(n_cameras, n).int(), isect_ids[order], flat[order].int()

    @staticmethod
    def isect_offset_encode(isect_ids, n_cameras, tile_width, tile_height):
        n_tiles = tile_width * tile_height
        tile_n_bits = n_tiles.bit_length()
        keys = (torch.arange(n_cameras)[:, None] << tile_n_bits) | torch.arange(n_tiles)[None, :]
        offsets = torch.searchsorted(isect_ids >> 32, keys.reshape(-1))  # first entry of each tile or later
        return offsets.int().reshape(n_cameras, tile_height, tile_width)

    @staticmethod
    def rasterize_to_indices_in_range(range_start, range_end, transmittances, means2d, conics, opacities,
                                      image_width, image_height, tile_size, isect_offsets, flatten_ids):
        n_cameras, n = opacities.shape
        tile_height, tile_width = isect_offsets.shape[1:3]
        n_isects = flatten_ids.shape[0]
        block = tile_size * tile_size
        offsets = isect_offsets.reshape(-1).long()
        means, conic, opac = means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1)
        out_gauss, out_index = [], []
        for camera in range(n_cameras):
            for ty in range(tile_height):
                for tx in range(tile_width):
                    t = (camera * tile_height + ty) * tile_width + tx
                    start = int(offsets[t])
                    end = n_isects if t == offsets.shape[0] - 1 else int(offsets[t + 1])
                    n_batches = -(-(end - start) // block)
                    if range_start >= n_batches:
                        continue
                    lo = start + block * range_start
                    hi = min(end, start + block * min(range_end, n_batches))
                    if hi <= lo:
                        continue
                    g = flatten_ids[lo:hi].long()
                    ys, xs = torch.meshgrid(
                        torch.arange(ty * tile_size, min((ty + 1) * tile_size, image_height)),
                        torch.arange(tx * tile_size, min((tx + 1) * tile_size, image_width)), indexing="ij",
                    )
                    px, py = xs.reshape(-1), ys.reshape(-1)
                    dx = means[g][None, :, 0] - (px[:, None].float() + 0.5)
                    dy = means[g][None, :, 1] - (py[:, None].float() + 0.5)
                    sigma = 0.5 * (conic[g, 0] * dx * dx + conic[g, 2] * dy * dy) + conic[g, 1] * dx * dy
                    alpha = torch.clamp_max(opac[g] * torch.exp(-sigma), 0.999)
                    valid = ~((sigma < 0) | (alpha < 1.0 / 255.0))
                    factors = torch.where(valid, 1.0 - alpha, torch.ones_like(alpha))
                    start_t = transmittances[camera, py, px][:, None]
                    # next_trans = trans * (1 - alpha), one multiplication after the other from the input value.
                    next_t = torch.cumprod(torch.cat([start_t, factors], dim=1), dim=1)[:, 1:]
                    done = torch.cumsum((valid & (next_t <= 1e-4)).int(), dim=1) > 0
                    pixel_k, k = torch.nonzero(valid & ~done, as_tuple=True)
                    out_gauss.append(g[k] % n)
                    out_index.append(camera * image_width * image_height + (py * image_width + px)[pixel_k])
        if not out_gauss:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty.clone(), empty.clone()
        index, gauss = torch.cat(out_index), torch.cat(out_gauss)
        order = torch.argsort(index, stable=True)
        index, gauss = index[order], gauss[order]
        hw = image_width * image_height
        return gauss, index % hw, index // hw


# -- scenes ---------------------------------------------------------------------------------------------------------


def projected_scene(n, width, height, n_cameras, seed, packed, opacity_boost=2.0):
    g = random_gaussians(n, sh_degree=1, extent=0.5, scale=0.1, seed=seed)
    g.opacity_logits = g.opacity_logits + opacity_boost
    viewmats, Ks = orbit_cameras(n_cameras, width, height, radius=2.0)
    args = g.render_args()
    proj, _ = project(args["means"], args["quats"], args["scales"], args["opacities"], args["colors"], viewmats, Ks,
                      width, height, sh_degree=1)
    return pack(proj) if packed else proj


def layered_scene(width, height, layers, opacity=0.9, low_alpha_layers=0, low_opacity=0.05, seed=0):
    """`layers` broad Gaussians, each covering the whole image, one behind the other (then `low_alpha_layers`
    faint ones): every pixel has that many candidates and stops after a handful."""
    g = torch.Generator().manual_seed(seed)
    n = layers + low_alpha_layers
    means2d = torch.tensor([width / 2, height / 2]) + (torch.rand(n, 2, generator=g) - 0.5) * 4
    std = width * (1.0 + torch.rand(n, generator=g))
    b = 0.1 * (torch.rand(n, generator=g) - 0.5) / std**2
    conics = torch.stack([1 / std**2, b, 1 / std**2], dim=-1)
    opacities = torch.cat([torch.full((layers,), opacity), torch.full((low_alpha_layers,), low_opacity)])
    opacities = opacities * (1 - 0.02 * torch.rand(n, generator=g))
    depths = 1.0 + torch.arange(n, dtype=torch.float32) + 0.5 * torch.rand(n, generator=g)
    return ProjectedGaussians(
        means2d=means2d, conics=conics, opacities=opacities, depths=depths, radii=torch.ceil(3 * std).int(),
        colors=torch.zeros(n, 3), camera_ids=torch.zeros(n, dtype=torch.long), gaussian_ids=torch.arange(n),
    )


def assert_same_pairs(got: Pairs, expected: Pairs):
    assert torch.equal(got.pixel, expected.pixel) and torch.equal(got.row, expected.row)


RANDOM_CASES = [  # n, width, height, cameras, seed, packed, tile
    (60, 45, 33, 1, 0, False, 8),
    (400, 45, 33, 2, 1, True, 16),
    (1500, 40, 24, 1, 2, False, 16),
    (300, 23, 17, 2, 3, False, 8),
]


# -- the torch path ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", RANDOM_CASES)
@pytest.mark.parametrize("batch_candidates", ["small", 997, None])
def test_torch_path_returns_the_pairs_of_the_unbounded_enumeration_and_of_brute_force(case, batch_candidates):
    n, width, height, cameras, seed, packed, tile = case
    if batch_candidates == "small":
        # Batches far smaller than a tile's candidates, so that most batches end inside a tile and a pixel's pairs
        # span several (the cases have 560-54,000 candidates a tile): 5 on the 60-Gaussian case; on the others the
        # 14,000-65,000 batches of 5 added ~50 s of Python loop, not boundaries of another kind.
        batch_candidates = 5 if n <= 100 else 53
    proj = projected_scene(n, width, height, cameras, seed, packed)
    expected = unbounded_find_pairs(proj, cameras, width, height, tile)
    stats = EnumerationStats()
    got = find_pairs(proj, cameras, width, height, tile, backend="torch", batch_candidates=batch_candidates, stats=stats)
    assert len(got) > 100
    assert_same_pairs(got, expected)
    assert_same_pairs(got, brute_force_pairs(proj, cameras, width, height, tile))
    if batch_candidates is not None:
        assert stats.peak_batch_candidates <= batch_candidates and stats.batches > 1


def test_deep_scene_stops_every_pixel_after_a_few_layers():
    width = height = 32
    proj = layered_scene(width, height, layers=200)
    stats = EnumerationStats()
    got = find_pairs(proj, 1, width, height, 16, backend="torch", batch_candidates=1000, stats=stats)
    assert_same_pairs(got, unbounded_find_pairs(proj, 1, width, height, 16))
    assert_same_pairs(got, brute_force_pairs(proj, 1, width, height, 16))
    per_pixel = torch.bincount(got.pixel, minlength=width * height)
    assert per_pixel.min() >= 3 and per_pixel.max() <= 6  # 0.9 opacity: T after 4 layers ~1e-4
    assert stats.candidates == 200 * width * height  # every layer is a candidate at every pixel
    assert stats.peak_batch_candidates == 1000
    assert MAX_PAIRS_PER_PIXEL == 2345


def test_no_visible_gaussian_gives_no_pairs():
    proj = layered_scene(16, 16, layers=3)
    proj.radii[:] = 0
    for backend_pairs in (find_pairs(proj, 1, 16, 16, 8, backend="torch"),
                          find_pairs_with_tile_kernels(proj, 1, 16, 16, 8, EmulatedGsplatKernels)):
        assert len(backend_pairs) == 0 and backend_pairs.pixel.dtype == torch.long


# -- the gsplat path's driver ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", RANDOM_CASES)
@pytest.mark.parametrize("call_budget", [1, None])
def test_tile_kernel_driver_returns_the_torch_paths_pairs(case, call_budget):
    """The CUDA path's logic (tile lists, call planning, per-call offsets, carried state, row merges) with the
    stand-in kernels. Budget 1 is raised to one (tile, depth batch) cell per call: the most calls possible."""
    n, width, height, cameras, seed, packed, tile = case
    proj = projected_scene(n, width, height, cameras, seed, packed)
    stats = EnumerationStats()
    got = find_pairs_with_tile_kernels(proj, cameras, width, height, tile, EmulatedGsplatKernels,
                                       call_budget=call_budget, stats=stats)
    assert_same_pairs(got, find_pairs(proj, cameras, width, height, tile, backend="torch"))
    assert stats.tile_intersections > 0 and stats.pairs == len(got)
    assert stats.candidates >= len(got)  # the kernel returns the pairs above 1/255; the cut is ours
    tile_rows = cameras * math.ceil(height / tile)
    if call_budget == 1:
        assert stats.peak_batch_bound <= (tile * tile) ** 2
        assert stats.batches > tile_rows  # tile rows split into several calls
    else:
        assert stats.batches <= tile_rows  # each tile row fits one call


def test_tile_kernel_driver_splits_deep_tiles_into_depth_batches():
    """300 layers and 8-pixel tiles: each tile list has 300 entries, 5 depth batches of 64 for the kernel. With
    the smallest budget each call is one (tile, batch) cell, so pixels stop in one call and must get nothing
    from the next."""
    width = height = 16
    proj = layered_scene(width, height, layers=150, low_alpha_layers=150)
    stats = EnumerationStats()
    got = find_pairs_with_tile_kernels(proj, 1, width, height, 8, EmulatedGsplatKernels, call_budget=1, stats=stats)
    assert_same_pairs(got, brute_force_pairs(proj, 1, width, height, 8))
    assert stats.batches == 4 * 5
    # Only the first batch of each tile returns pairs: its pixels stop there and get transmittance 0 afterwards.
    assert stats.candidates == width * height * 64


def test_stand_in_kernel_is_gsplats_rule_and_its_own_depth_loop_reopens_stopped_pixels():
    """One call over every depth batch keeps the kernel's stop flag: the stand-in then returns exactly the
    brute-force pairs. gsplat's `_rasterize_to_pixels` loops over depth batches carrying the transmittance only;
    a pixel that stopped in one batch then takes the faint Gaussians of the next."""
    width = height = 16
    tile = 8
    proj = layered_scene(width, height, layers=64, low_alpha_layers=64, opacity=0.95)
    kernels = EmulatedGsplatKernels
    tiles = math.ceil(width / tile)
    _, isect_ids, flatten_ids = kernels.isect_tiles(proj.means2d[None], proj.radii[None], proj.depths[None], tile,
                                                    tiles, tiles)
    offsets = kernels.isect_offset_encode(isect_ids, 1, tiles, tiles)
    args = (proj.means2d[None], proj.conics[None], proj.opacities[None], width, height, tile, offsets, flatten_ids)
    gauss, pixel, _ = kernels.rasterize_to_indices_in_range(0, 1 << 30, torch.ones(1, height, width), *args)
    assert_same_pairs(Pairs(pixel, gauss), brute_force_pairs(proj, 1, width, height, tile))

    transmittance = torch.ones(1, height, width)
    taken = []
    for batch in range(2):  # 128 entries per tile: two batches of 64
        gauss, pixel, _ = kernels.rasterize_to_indices_in_range(batch, batch + 1, transmittance, *args)
        taken.append(Pairs(pixel, gauss))
        _, alpha = _pair_alpha(proj.means2d[gauss, 0] - ((pixel % width).float() + 0.5),
                               proj.means2d[gauss, 1] - ((pixel // width).float() + 0.5), proj.conics[gauss],
                               proj.opacities[gauss])
        log_factor = torch.zeros(width * height).index_add_(0, pixel, torch.log1p(-alpha))
        transmittance = transmittance * torch.exp(log_factor).reshape(1, height, width)
    assert len(taken[0]) > 0
    # Every pixel stopped in the first batch (brute force: opaque layers only); nearly all reopen on faint ones.
    assert (taken[1].row >= 64).all()
    assert torch.unique(taken[1].pixel).numel() >= 0.9 * width * height
    assert (taken[1].row[:, None] != brute_force_pairs(proj, 1, width, height, tile).row[None, :]).all()


# -- memory ---------------------------------------------------------------------------------------------------------


def allocator_peak_bytes(fn):
    """Peak of live CPU tensor bytes while `fn` runs (torch's allocator events, via the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda item: item[0])  # stable: alloc/free at the same ns keep their recorded order
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def test_peak_memory_does_not_grow_with_depth_complexity():
    width = height = 64
    batch = 1 << 13
    measured = {}
    for layers in (16, 256):
        proj = layered_scene(width, height, layers=layers)
        stats = EnumerationStats()
        bounded_peak, bounded = allocator_peak_bytes(
            lambda: find_pairs(proj, 1, width, height, 16, backend="torch", batch_candidates=batch, stats=stats))
        unbounded_peak, unbounded = allocator_peak_bytes(lambda: unbounded_find_pairs(proj, 1, width, height, 16))
        assert_same_pairs(bounded, unbounded)
        measured[layers] = (bounded_peak, unbounded_peak, stats, len(bounded))
        print(f"{layers} layers: {stats.candidates} candidates, {len(bounded)} pairs; peak {bounded_peak / 1e6:.2f} MB "
              f"batched ({stats.batches} batches of {batch}), {unbounded_peak / 1e6:.2f} MB unbatched")
    (shallow, shallow_old, shallow_stats, shallow_pairs), (deep, deep_old, deep_stats, deep_pairs) = measured[16], measured[256]
    assert deep_stats.candidates == 16 * shallow_stats.candidates
    assert abs(deep_pairs - shallow_pairs) < 0.1 * shallow_pairs  # same composite depth
    # 16x the candidates: the unbatched peak follows them, the batched one stays at its batch.
    assert deep_old > 8 * shallow_old
    assert deep < 1.25 * shallow
    assert deep < deep_old / 10
    # The batch's share is about 110 bytes per candidate; the rest is per pixel and per pair.
    assert deep < 200 * batch + 60 * width * height + 60 * deep_pairs


# -- the stand-in is gsplat's interface -------------------------------------------------------------------------------


def test_stand_in_kernels_take_gsplats_arguments():
    """The driver is tested against the stand-in: its functions must take what gsplat 1.4.0's take."""
    import inspect

    import gsplat.cuda._wrapper as wrapper

    for name in ("isect_tiles", "isect_offset_encode", "rasterize_to_indices_in_range"):
        ours = list(inspect.signature(getattr(EmulatedGsplatKernels, name)).parameters)
        theirs = list(inspect.signature(getattr(wrapper, name)).parameters)
        assert theirs[: len(ours)] == ours, name


def test_gsplat_backend_calls_gsplats_wrapper(monkeypatch):
    """`find_pairs(backend="gsplat")` (the default on CUDA) goes through gsplat.cuda._wrapper: run here with the
    wrapper's three kernels replaced by the stand-in."""
    import gsplat.cuda._wrapper as wrapper

    calls = []
    for name in ("isect_tiles", "isect_offset_encode", "rasterize_to_indices_in_range"):
        stand_in = getattr(EmulatedGsplatKernels, name)
        monkeypatch.setattr(wrapper, name, lambda *a, _f=stand_in, _n=name, **k: calls.append(_n) or _f(*a, **k))
    proj = projected_scene(300, 40, 30, 1, seed=7, packed=False)
    got = find_pairs(proj, 1, 40, 30, 16, backend="gsplat")
    assert_same_pairs(got, find_pairs(proj, 1, 40, 30, 16, backend="torch"))
    assert calls[:2] == ["isect_tiles", "isect_offset_encode"] and "rasterize_to_indices_in_range" in calls


def test_segmented_cumsum_by_column_matches_the_plain_scan_and_brute_force():
    # GPUs scan [n, k] values one column at a time (CUDA's outer-dimension scan is sequential); both layouts
    # must give each segment's running sums.
    generator = torch.Generator().manual_seed(0)
    keys = torch.sort(torch.randint(0, 40, (500,), generator=generator)).values
    values = torch.rand(500, 3, generator=generator, dtype=torch.float64)
    by_column = cumsum_first_dim(values, by_column=True)
    assert torch.equal(by_column, cumsum_first_dim(values, by_column=False))
    assert torch.equal(cumsum_first_dim(values[:, :1, None].expand(500, 1, 2), by_column=True)[..., 1], by_column[:, :1])
    inclusive = segmented_cumsum(values, segment_starts(keys), exclusive=False)
    exclusive = segmented_cumsum(values, segment_starts(keys), exclusive=True)
    for key in keys.unique():
        rows = torch.nonzero(keys == key).squeeze(1)
        expected = torch.cumsum(values[rows], dim=0)
        torch.testing.assert_close(inclusive[rows], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(exclusive[rows], expected - values[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("by_search", [False, True])
def test_segment_starts_and_ends_on_both_paths_match_brute_force(by_search):
    # CPU takes running extrema, GPUs binary searches; both must name each key's first and last element.
    generator = torch.Generator().manual_seed(1)
    for keys in (torch.sort(torch.randint(0, 30, (300,), generator=generator)).values, torch.tensor([7]),
                 torch.arange(5), torch.zeros(6, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        starts, ends = segment_starts(keys, by_search=by_search), segment_ends(keys, by_search=by_search)
        expected_starts = [int(torch.nonzero(keys == k)[0]) for k in keys]
        expected_ends = [int(torch.nonzero(keys == k)[-1]) for k in keys]
        assert starts.tolist() == expected_starts and ends.tolist() == expected_ends
