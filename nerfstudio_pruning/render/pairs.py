"""The (pixel, Gaussian) pairs a view composites under gsplat 1.4.0's rules, and their alpha and transmittance.

Rules, read from `gsplat/cuda/csrc/rasterize_to_pixels_fwd.cu` and `isect_tiles.cu` of gsplat 1.4.0:
- a Gaussian is considered for every pixel of every tile its 3-sigma radius touches (tile culling, not a
  per-pixel radius test), with pixel centres at (x + 0.5, y + 0.5);
- alpha = min(0.999, opacity * exp(-sigma)); pairs with sigma < 0 or alpha < 1/255 are skipped;
- Gaussians are composited front to back by camera-space depth; a pixel stops before the Gaussian that would
  bring its transmittance to 1e-4 or below (that Gaussian is excluded, and so is everything behind it).

`find_pairs` lists the pairs that pass, sorted by pixel and front to back within a pixel. Both of its paths walk
the Gaussians front to back in bounded batches and carry, per pixel, the running transmittance (float64 log)
and whether the pixel has stopped: a batch's candidates are tested against 1/255, cut at T <= 1e-4 with the
carried transmittance, and only the pairs that pass are kept; candidates at stopped pixels are dropped before
any sort (the gsplat path does not even produce them). So no buffer holds the candidates behind the cut (depth
complexity), only one batch of them.

- Torch path (CPU tensors with NSP_CPU_RASTERIZER=torch, or `backend="torch"`): each visible Gaussian's tiles,
  narrowed to where its alpha can reach 1/255, give a rectangle of candidate pixels; the rectangles of the
  depth-sorted Gaussians form one stream, cut into batches of `batch_candidates` candidates (a batch may end in
  the middle of a Gaussian's rectangle: pixels differ, so each pixel still sees its Gaussians in depth order).
- gsplat path (CUDA tensors): gsplat's own `isect_tiles` / `isect_offset_encode` tile lists and its
  `rasterize_to_indices_in_range` kernel, called tile row by tile row and depth batch by depth batch (the
  kernel's batches are `tile_size**2` entries of one tile's depth-sorted list). The kernel keeps no state between
  calls: gsplat's own depth-batched loop (`_torch_impl._rasterize_to_pixels`) carries the transmittance only,
  so a pixel that stopped in one batch starts again in the next and takes later low-alpha Gaussians it must not.
  Here each call gets transmittance +inf for live pixels (the kernel then returns every pair passing its
  sigma and 1/255 tests, with opacities raised by 1e-5 so that its fast-math `__expf` cannot drop a pair torch
  keeps) and 0 for stopped ones (the kernel returns nothing for them); alpha is recomputed in torch, and the
  cut is the same float64 code as the torch path. Calls are planned from a per-(tile, depth batch) bound on
  the pairs they can return (each Gaussian's narrowed rectangle, at most a tile), at most `call_budget`, and
  never span two tile rows: rows come out in pixel order, and only a row split over several calls is re-sorted.

Peak memory of one call, bytes. Np = C H W pixels, V = visible rows, N = projected rows, P = pairs returned,
I = tile intersections (gsplat path), Q = candidates one batch holds (at most batch_candidates, default 2^20 on
CPU and 2^22 on CUDA) or one kernel call returns (at most call_budget, default 2^22):

    torch path:    9 Np  +  150 V  +  100 Q  +  40 P
    gsplat path:  26 Np  +  150 N  +   24 I  +  130 Q  +  24 P  (+ 40 x the pairs of one tile row, while merged)

9 Np is the carried state (float64 log transmittance, int8 stop flag); the gsplat path adds the kernel's
transmittance input and its per-call count buffers. 150 V (150 N) are the depth order and the candidate
rectangles. 40 P is the pair list and its final stable sort by pixel. The phases do not overlap in time, so the
sum is an upper estimate. Measured on CPU for the torch path (benchmarks/gpu/bench_pair_memory.py, torch's
allocator events): 97 bytes per candidate, 38 per pair, 152 per visible row, within the formula on every run.
On an H200 (CUDA allocator, docs/cuda_path.md section 7) the measured peaks came to at most 1.29x (gsplat
path: 31 bytes per pair, 2 per candidate) and 1.40x (torch path: 56 per pair) of the formula, which is
therefore an estimate there, not a bound. A gsplat call holds at least one whole (tile, depth batch) cell,
tile_size**4 candidates, whatever `call_budget` asks. None of the terms grows with the candidates behind the early stop: a pixel composites at most
ceil(log(1e-4) / log(1 - 1/255)) = 2345 pairs whatever lies behind it (`constants.MAX_PAIRS_PER_PIXEL`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_pruning.render.backend import Backend, on_gpu
from nerfstudio_pruning.render.constants import (
    ALPHA_MAX,
    ALPHA_MIN,
    ALPHA_MIN_RECIPROCAL,
    LOG_TRANSMITTANCE_MIN,
    TILE_SIZE,
)
from nerfstudio_pruning.render.projection import ProjectedGaussians

# Candidate pairs per batch of the torch path (~110 bytes each: ~0.1 GB on CPU, ~0.5 GB on CUDA).
CPU_BATCH_CANDIDATES = 1 << 20
CUDA_BATCH_CANDIDATES = 1 << 22
# Worst-case pairs one gsplat kernel call may return (~130 bytes each with what follows it: ~0.55 GB).
CUDA_CALL_BUDGET = 1 << 22
# Opacity handed to gsplat's kernel is raised by this factor: its `__expf` (fast math) and fused multiply-adds
# differ from torch's float32 exp by a few ulp (~1e-6 relative), so the kernel's 1/255 test must be looser than
# ours for it to return every pair torch keeps; torch then re-applies the exact test.
KERNEL_OPACITY_SLACK = 1e-5
# Tile-list entries processed at once when bounding the kernel calls (~56 bytes each while processed).
ISECT_SLICE = 1 << 20


@dataclass
class Pairs:
    """Contributing (pixel, projected Gaussian) pairs, sorted by pixel and front to back within a pixel.

    `pixel` indexes the flattened [C, H, W] image stack, `row` indexes `ProjectedGaussians`.
    """

    pixel: Tensor  # [P] int64
    row: Tensor  # [P] int64

    def __len__(self) -> int:
        return int(self.pixel.shape[0])


@dataclass
class EnumerationStats:
    """What one `find_pairs` call held at most: the numbers its memory bound is stated in (tests and benchmarks
    pass one in; it changes nothing)."""

    batches: int = 0  # candidate batches (torch path) or kernel calls (gsplat path)
    # torch path: candidate pixels of the narrowed rectangles; gsplat path: pairs the kernel returned, those above
    # 1/255 at pixels not yet stopped
    candidates: int = 0
    peak_batch_candidates: int = 0  # the most candidates alive at once: the bounded part
    peak_batch_bound: int = 0  # gsplat path: the planned worst case of the largest call (<= call_budget)
    pairs: int = 0  # pairs returned
    pixel_state_bytes: int = 0  # carried per-pixel transmittance and stop flags
    tile_intersections: int = 0  # gsplat path: entries of the tile lists

    def add_batch(self, candidates: int, bound: int = 0) -> None:
        self.batches += 1
        self.candidates += candidates
        self.peak_batch_candidates = max(self.peak_batch_candidates, candidates)
        self.peak_batch_bound = max(self.peak_batch_bound, bound)


def _gpu_form(tensor: Tensor, choice: Optional[bool]) -> bool:
    """Whether a scan below takes its GPU form: `choice` when given (tests run both forms on a CPU), else whether
    `tensor` is on a GPU. CUDA runs a 1-D cummax/cummin as a single-block scan and scans dim 0 of an [n, k] tensor
    with one thread per column: on an H100 at 100k Gaussians 1920x1080 these cost 0.44 s and 10.4 s of an 11.5 s
    Fisher pass (docs/cuda_path.md section 8). On a CPU the plain scans are the faster ones."""
    return tensor.device.type != "cpu" if choice is None else choice


def segment_starts(sorted_keys: Tensor, by_search: Optional[bool] = None) -> Tensor:
    """For each element of an ascending key array, the index of the first element with the same key: a running
    maximum on CPU, a binary search for each key on GPUs (`_gpu_form`)."""
    if _gpu_form(sorted_keys, by_search):
        return torch.searchsorted(sorted_keys, sorted_keys, side="left")
    n = sorted_keys.shape[0]
    is_start = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    if n > 1:
        is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(n, device=sorted_keys.device)
    return torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), dim=0).values


def segment_ends(sorted_keys: Tensor, by_search: Optional[bool] = None) -> Tensor:
    """For each element of an ascending key array, the index of the last element with the same key: a reversed
    running minimum on CPU, a binary search on GPUs (`_gpu_form`); no host round trip either way."""
    if _gpu_form(sorted_keys, by_search):
        return torch.searchsorted(sorted_keys, sorted_keys, side="right") - 1
    n = sorted_keys.shape[0]
    index = torch.arange(n, device=sorted_keys.device)
    is_last = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    if n > 1:
        is_last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.flip(torch.cummin(torch.flip(torch.where(is_last, index, n), [0]), dim=0).values, [0])


def cumsum_first_dim(values: Tensor, by_column: Optional[bool] = None) -> Tensor:
    """`torch.cumsum(values, dim=0)`; on GPUs (`_gpu_form`) one column at a time, so that each is a 1-D scan,
    which CUDA runs device-wide (cub), instead of one thread walking each column's n rows."""
    if values.dim() < 2 or not _gpu_form(values, by_column):
        return torch.cumsum(values, dim=0)
    columns = values.reshape(values.shape[0], -1).unbind(1)
    return torch.stack([torch.cumsum(column, dim=0) for column in columns], dim=1).reshape(values.shape)


def segmented_cumsum(values: Tensor, starts: Tensor, exclusive: bool) -> Tensor:
    """Cumulative sum restarted at every segment; `starts` from `segment_starts`. Returns float64.

    Done in float64 on one global cumsum: subtracting the running total at each segment start then loses
    ~1e-16 relative precision instead of float32's ~1e-7.
    """
    v = values.double()
    total = cumsum_first_dim(v)
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
    level = 2.0 * torch.log((ALPHA_MIN_RECIPROCAL * opacities).clamp_min(1.0))  # 0 when no pixel can reach 1/255
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


def _alpha_at_pixels(proj: ProjectedGaussians, row: Tensor, px: Tensor, py: Tensor) -> Tuple[Tensor, Tensor]:
    """sigma and alpha of rows `row` at pixels (px, py), in the projection's dtype."""
    means2d = proj.means2d[row]
    dx = means2d[:, 0] - (px.to(means2d.dtype) + 0.5)
    dy = means2d[:, 1] - (py.to(means2d.dtype) + 0.5)
    return _pair_alpha(dx, dy, proj.conics[row], proj.opacities[row])


class _TransmittanceCut:
    """Per pixel: the transmittance so far (float64 log, as the unbatched cut computed it) and whether the pixel
    has stopped. Batches of a pixel's candidates must arrive front to back."""

    def __init__(self, n_pixels: int, device: torch.device) -> None:
        self.log_transmittance = torch.zeros(n_pixels, dtype=torch.float64, device=device)
        # int8 rather than bool: updated with scatter_reduce("amax"), which is deterministic with repeated pixels.
        self.stopped = torch.zeros(n_pixels, dtype=torch.int8, device=device)

    @property
    def nbytes(self) -> int:
        return self.log_transmittance.numel() * 8 + self.stopped.numel()

    def apply(self, pixel: Tensor, row: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
        """Of the candidates (sorted by pixel, front to back, all passing the 1/255 test), those the pixel still
        composites; the state then moves past them."""
        if pixel.shape[0] == 0:
            return pixel, row
        log_after = self.log_transmittance[pixel] + segmented_cumsum(
            torch.log1p(-alpha), segment_starts(pixel), exclusive=False
        )
        # A pair is kept while the transmittance *after* it stays above 1e-4; the first that fails stops the pixel.
        passes = (log_after > LOG_TRANSMITTANCE_MIN) & (self.stopped[pixel] == 0)
        self.stopped.scatter_reduce_(0, pixel, (~passes).to(torch.int8), reduce="amax")
        # log T only decreases along a pixel, so its minimum over the passing pairs is the last one's.
        self.log_transmittance.scatter_reduce_(
            0, pixel, torch.where(passes, log_after, torch.full_like(log_after, math.inf)), reduce="amin"
        )
        return pixel[passes], row[passes]


def _sorted_by_pixel(pixels: List[Tensor], rows: List[Tensor], device: torch.device) -> Pairs:
    """Concatenate batches (each in front-to-back order per pixel) into one list sorted by pixel; the stable
    sort keeps each pixel's pairs front to back."""
    if not pixels:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Pairs(pixel=empty, row=empty.clone())
    if len(pixels) == 1:
        return Pairs(pixel=pixels.pop(), row=rows.pop())
    # The batches are released as soon as they are joined, and each array is replaced by its sorted copy in turn:
    # the sort then holds ~40 bytes per pair at its peak instead of ~56.
    pixel = torch.cat(pixels)
    pixels.clear()
    row = torch.cat(rows)
    rows.clear()
    order = torch.argsort(pixel, stable=True)
    pixel = pixel[order]
    row = row[order]
    return Pairs(pixel=pixel, row=row)


@torch.no_grad()
def find_pairs(
    proj: ProjectedGaussians,
    n_cameras: int,
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
    *,
    backend: Optional[str] = None,
    batch_candidates: Optional[int] = None,
    call_budget: Optional[int] = None,
    stats: Optional[EnumerationStats] = None,
) -> Pairs:
    """Enumerate every (pixel, Gaussian) pair gsplat would composite, sorted by pixel, front to back per pixel.

    backend: "gsplat" (gsplat's CUDA tile lists and kernel; the default on CUDA tensors) or "torch" (the
    default elsewhere). `batch_candidates` / `call_budget` bound the memory of the torch / gsplat path (module
    docstring); by default they depend on the device.
    """
    if backend is None:
        backend = Backend.GSPLAT if on_gpu(proj.means2d) else Backend.TORCH
    if backend == Backend.GSPLAT:
        from gsplat.cuda import _wrapper as gsplat_kernels  # gsplat's CUDA side: imported only where it runs

        return find_pairs_with_tile_kernels(
            proj, n_cameras, width, height, tile_size, gsplat_kernels, call_budget=call_budget, stats=stats
        )
    if backend != Backend.TORCH:
        raise ValueError(f"backend must be 'gsplat' or 'torch', got {backend!r}")
    return _find_pairs_torch(proj, n_cameras, width, height, tile_size, batch_candidates, stats)


def _find_pairs_torch(
    proj: ProjectedGaussians,
    n_cameras: int,
    width: int,
    height: int,
    tile_size: int,
    batch_candidates: Optional[int],
    stats: Optional[EnumerationStats],
) -> Pairs:
    device = proj.means2d.device
    if batch_candidates is None:
        batch_candidates = CUDA_BATCH_CANDIDATES if proj.means2d.is_cuda else CPU_BATCH_CANDIDATES
    if batch_candidates < 1:
        raise ValueError(f"batch_candidates must be >= 1, got {batch_candidates}")
    visible = torch.nonzero(proj.radii > 0).squeeze(1)
    # Depth order (gsplat breaks depth ties by row index, as a stable argsort does).
    visible = visible[torch.argsort(proj.depths[visible], stable=True)]
    rects = _candidate_pixel_rects(
        proj.means2d[visible], proj.radii[visible], proj.conics[visible], proj.opacities[visible], width, height, tile_size
    )
    rect_w = (rects[:, 1] - rects[:, 0]).clamp_min(0)
    counts = rect_w * (rects[:, 3] - rects[:, 2]).clamp_min(0)
    ends = torch.cumsum(counts, dim=0)
    rect_first = ends - counts  # index of each rectangle's first candidate in the stream
    total = int(ends[-1]) if ends.numel() else 0  # the one host sync before the loop

    pixels_per_camera = width * height
    cut = _TransmittanceCut(n_cameras * pixels_per_camera, device)
    kept_pixels: List[Tensor] = []
    kept_rows: List[Tensor] = []
    for first in range(0, total, batch_candidates):
        candidate = torch.arange(first, min(first + batch_candidates, total), device=device)
        # Which rectangle each candidate falls in; rectangles with no candidates are never hit (right=True).
        gaussian = torch.searchsorted(ends, candidate, right=True)
        offset = candidate - rect_first[gaussian]
        del candidate
        w = rect_w[gaussian]
        px = rects[gaussian, 0] + offset % w
        py = rects[gaussian, 2] + offset // w
        del offset, w
        row = visible[gaussian]
        del gaussian
        pixel = proj.camera_ids[row] * pixels_per_camera + py * width + px
        sigma, alpha = _alpha_at_pixels(proj, row, px, py)
        del px, py
        live = (sigma >= 0) & (alpha >= ALPHA_MIN) & (cut.stopped[pixel] == 0)
        if stats is not None:
            stats.add_batch(int(live.shape[0]))
        pixel, row, alpha = pixel[live], row[live], alpha[live]
        del sigma, live
        # Candidates come Gaussian by Gaussian in depth order: a stable sort by pixel keeps that order per pixel.
        order = torch.argsort(pixel, stable=True)
        pixel, row = cut.apply(pixel[order], row[order], alpha[order])
        kept_pixels.append(pixel)
        kept_rows.append(row)
    pixel_state_bytes = cut.nbytes
    # The per-Gaussian arrays and the carried state are done with: released before the final sort, the peak of
    # which is then 40 P rather than 40 P + 150 V.
    del visible, rects, rect_w, counts, ends, rect_first, cut
    pairs = _sorted_by_pixel(kept_pixels, kept_rows, device)
    if stats is not None:
        stats.pairs = len(pairs)
        stats.pixel_state_bytes = pixel_state_bytes
    return pairs


# -- the gsplat (CUDA) path -----------------------------------------------------------------------------------------


@torch.no_grad()
def find_pairs_with_tile_kernels(
    proj: ProjectedGaussians,
    n_cameras: int,
    width: int,
    height: int,
    tile_size: int,
    kernels: Any,
    call_budget: Optional[int] = None,
    stats: Optional[EnumerationStats] = None,
) -> Pairs:
    """`find_pairs` from gsplat's tile lists and `rasterize_to_indices_in_range` kernel.

    `kernels` provides `isect_tiles`, `isect_offset_encode` and `rasterize_to_indices_in_range` with the
    signatures of `gsplat.cuda._wrapper` (1.4.0): that module on CUDA, a stand-in with the same semantics in the
    tests, which is how this driver is checked on machines without a GPU.
    """
    device = proj.means2d.device
    block = tile_size * tile_size
    budget = max(CUDA_CALL_BUDGET if call_budget is None else call_budget, block * block)
    tile_w = math.ceil(width / tile_size)
    tile_h = math.ceil(height / tile_size)
    pixels_per_camera = width * height
    cut = _TransmittanceCut(n_cameras * pixels_per_camera, device)
    kept_pixels: List[Tensor] = []
    kept_rows: List[Tensor] = []
    for camera in range(n_cameras):
        # The kernel takes [C, N] rows; scoring passes one view, whose rows are all of this camera.
        rows = None if n_cameras == 1 else torch.nonzero(proj.camera_ids == camera).squeeze(1)
        pixels, row_lists = _camera_pairs(
            proj, rows, camera, width, height, tile_size, tile_w, tile_h, kernels, budget, cut, stats
        )
        kept_pixels += pixels
        kept_rows += row_lists
    if len(kept_pixels) <= 1:
        pairs = _sorted_by_pixel(kept_pixels, kept_rows, device)
    else:
        # Tile rows and cameras come in pixel order and each is sorted already. Each array's pieces are released
        # once joined: 24 bytes per pair at the peak rather than 32.
        pixel = torch.cat(kept_pixels)
        kept_pixels.clear()
        row = torch.cat(kept_rows)
        kept_rows.clear()
        pairs = Pairs(pixel=pixel, row=row)
    if stats is not None:
        stats.pairs = len(pairs)
        stats.pixel_state_bytes = cut.nbytes + 4 * pixels_per_camera
    return pairs


def _camera_pairs(
    proj: ProjectedGaussians,
    rows: Optional[Tensor],
    camera: int,
    width: int,
    height: int,
    tile_size: int,
    tile_w: int,
    tile_h: int,
    kernels: Any,
    budget: int,
    cut: _TransmittanceCut,
    stats: Optional[EnumerationStats],
) -> Tuple[List[Tensor], List[Tensor]]:
    """The pairs of one camera, as pixel-sorted pieces in pixel order (one per tile row)."""
    device = proj.means2d.device

    def of_camera(t: Tensor) -> Tensor:
        return t if rows is None else t[rows]

    # gsplat's kernels take float32 (they are instantiated for float only) and int32 radii.
    means2d = of_camera(proj.means2d).float().contiguous()
    if means2d.shape[0] == 0:
        return [], []
    conics = of_camera(proj.conics).float().contiguous()
    opacities = of_camera(proj.opacities).float()
    radii = of_camera(proj.radii).int().contiguous()
    depths = of_camera(proj.depths).float().contiguous()
    _, isect_ids, flatten_ids = kernels.isect_tiles(means2d[None], radii[None], depths[None], tile_size, tile_w, tile_h)
    n_isects = int(flatten_ids.shape[0])
    if stats is not None:
        stats.tile_intersections += n_isects
    if n_isects == 0:
        return [], []
    offsets = kernels.isect_offset_encode(isect_ids, 1, tile_w, tile_h)  # [1, tile_h, tile_w] int32
    n_tiles = tile_w * tile_h
    tile_starts = offsets.reshape(-1).long()
    tile_ends = torch.cat([tile_starts[1:], tile_starts.new_full((1,), n_isects)])

    # Bound on the pairs a call can return: a Gaussian gives at most one pair per pixel of its narrowed
    # rectangle, and at most a tile's worth in one tile.
    rects = _candidate_pixel_rects(means2d, radii, conics, opacities, width, height, tile_size)
    pixels_bound = ((rects[:, 1] - rects[:, 0]).clamp_min(0) * (rects[:, 3] - rects[:, 2]).clamp_min(0)).clamp_max(
        tile_size * tile_size
    )
    del rects
    block = tile_size * tile_size
    starts_host = tile_starts.cpu().numpy()
    ends_host = tile_ends.cpu().numpy()
    batches_per_tile = -(-(ends_host - starts_host) // block)  # ceil
    cell_first = np.concatenate([[0], np.cumsum(batches_per_tile)])  # cells (tile, depth batch) of each tile
    cell_bounds = _cell_bounds(isect_ids, flatten_ids, tile_starts, pixels_bound, block, cell_first, n_isects, device)
    del pixels_bound
    plan = _plan_kernel_calls(cell_bounds, cell_first, batches_per_tile, tile_w, tile_h, budget)

    kernel_transmittance = torch.full((1, height, width), math.inf, dtype=torch.float32, device=device)
    kernel_opacities = (opacities * (1.0 + KERNEL_OPACITY_SLACK))[None].contiguous()
    camera_stopped = cut.stopped[camera * width * height : (camera + 1) * width * height]
    pieces_pixels: List[Tensor] = []
    pieces_rows: List[Tensor] = []
    row_pixels: List[Tensor] = []
    row_rows: List[Tensor] = []
    current_tile_row = -1

    def flush() -> None:
        if row_pixels:
            merged = _sorted_by_pixel(row_pixels, row_rows, device)
            pieces_pixels.append(merged.pixel)
            pieces_rows.append(merged.row)
            row_pixels.clear()
            row_rows.clear()

    for tile_row, first_tile, end_tile, first_batch, end_batch, bound in plan:
        if tile_row != current_tile_row:
            flush()
            current_tile_row = tile_row
        # Only the tiles [first_tile, end_tile) have entries: the others get empty ranges (start = end), and the
        # entry list ends where the last of them does (the kernel takes the list's length as the last tile's end).
        lo, hi = int(starts_host[first_tile]), int(ends_host[end_tile - 1])
        call_offsets = offsets.clamp(lo, hi)
        gauss, pixel_in_camera, _ = kernels.rasterize_to_indices_in_range(
            first_batch, end_batch, kernel_transmittance, means2d[None], conics[None], kernel_opacities,
            width, height, tile_size, call_offsets, flatten_ids[:hi],
        )
        if stats is not None:
            stats.add_batch(int(gauss.shape[0]), bound)
        row = gauss if rows is None else rows[gauss]
        px, py = pixel_in_camera % width, pixel_in_camera // width
        sigma, alpha = _alpha_at_pixels(proj, row, px, py)
        live = (sigma >= 0) & (alpha >= ALPHA_MIN)
        del sigma, px, py
        # The kernel returns each pixel's pairs contiguous and front to back, pixels in increasing order.
        pixel = camera * width * height + pixel_in_camera[live]
        kept_pixel, kept_row = cut.apply(pixel, row[live], alpha[live])
        row_pixels.append(kept_pixel)
        row_rows.append(kept_row)
        kernel_transmittance.view(-1).masked_fill_(camera_stopped.bool(), 0.0)
    flush()
    return pieces_pixels, pieces_rows


def _cell_bounds(
    isect_ids: Tensor,
    flatten_ids: Tensor,
    tile_starts: Tensor,
    pixels_bound: Tensor,
    block: int,
    cell_first: np.ndarray,
    n_isects: int,
    device: torch.device,
) -> np.ndarray:
    """Per (tile, depth batch of `block` entries) cell, the most pairs the kernel can return for it: the sum of
    its Gaussians' pixel bounds. One host transfer; tile-list entries are taken in slices."""
    cell_first_t = torch.as_tensor(cell_first[:-1], dtype=torch.long, device=device)
    bounds = torch.zeros(int(cell_first[-1]), dtype=torch.long, device=device)
    for first in range(0, n_isects, ISECT_SLICE):
        last = min(first + ISECT_SLICE, n_isects)
        # One camera per call: the id's upper 32 bits are the tile alone (the camera bits are zero).
        tile = isect_ids[first:last] >> 32
        batch = (torch.arange(first, last, device=device) - tile_starts[tile]) // block
        bounds.index_add_(0, cell_first_t[tile] + batch, pixels_bound[flatten_ids[first:last].long()])
    return bounds.cpu().numpy()


def _plan_kernel_calls(
    cell_bounds: np.ndarray,
    cell_first: np.ndarray,
    batches_per_tile: np.ndarray,
    tile_w: int,
    tile_h: int,
    budget: int,
) -> List[Tuple[int, int, int, int, int, int]]:
    """Kernel calls (tile_row, first_tile, end_tile, first_batch, end_batch, bound) covering every cell once.

    A call covers consecutive tiles of one tile row and a range of depth batches; its bound (the sum of its
    cells') stays within `budget` unless one cell alone exceeds it. Whole tiles are grouped while their sum fits;
    a tile that does not fit alone is split into depth ranges, in order, so each pixel sees its batches front to
    back.
    """
    running = np.concatenate([[0], np.cumsum(cell_bounds)])
    tile_totals = running[cell_first[1:]] - running[cell_first[:-1]]
    calls = []
    for tile_row in range(tile_h):
        tile = tile_row * tile_w
        row_end = tile + tile_w
        while tile < row_end:
            if batches_per_tile[tile] == 0:
                tile += 1
                continue
            if tile_totals[tile] <= budget:
                end, total = tile + 1, int(tile_totals[tile])
                while end < row_end and total + tile_totals[end] <= budget:
                    total += int(tile_totals[end])
                    end += 1
                calls.append((tile_row, tile, end, 0, int(batches_per_tile[tile:end].max()), total))
                tile = end
                continue
            cells = cell_bounds[cell_first[tile] : cell_first[tile + 1]]
            batch = 0
            while batch < cells.shape[0]:
                end, total = batch + 1, int(cells[batch])
                while end < cells.shape[0] and total + cells[end] <= budget:
                    total += int(cells[end])
                    end += 1
                calls.append((tile_row, tile, tile + 1, batch, end, total))
                batch = end
            tile += 1
    return calls


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
