"""Per-(pixel, Gaussian) statistics of a composite: the engine under both pruning scores.

PUP's Fisher blocks and VEDAL's leave-one-out importance are both sums, over the (pixel, Gaussian) pairs a
view composites, of closed-form functions of that pair's alpha, transmittance T, colour c and the colour
composited behind it S. This module enumerates the pairs, computes those quantities and the per-pair gradients
of the pixel, and hands them out in chunks, so that callers accumulate per-Gaussian results with `index_add_`
and never hold a pixels x Gaussians array. The derivations are in docs/methods.md.

Conventions (as `render/pairs.py`): pixel centres at (x + 0.5, y + 0.5); dx = mean2d_x - (x + 0.5); the conic
(a, b, c) gives sigma = 0.5 (a dx^2 + c dy^2) + b dx dy; alpha = min(ALPHA_MAX, o exp(-sigma)); opacities are
effective ones (antialiasing compensation included).

Precision, per device. The reductions run in float64 everywhere: the segmented sums behind T and S (one global
cumsum minus its value at each pixel's start, which in float32 would lose the running total's digits) and the
per-Gaussian sums of `sum_over_pairs`. The per-pair values themselves (`PairStatistics`) are float64 on CPU and
for float64 models, where it costs little, and float32 on CUDA for float32 models: consumer GPUs run float64 at
1/32 to 1/64 of float32. Cast back to float32 only after its float64 reduction, S keeps float32's relative
precision, and S / (1 - alpha) at the 0.999 clamp stays within ~1e-7 of T (S <= T (1 - alpha) max c).
`statistics_dtype` overrides the choice (tests and benchmarks run the CUDA precision on CPU with it).

Chunks are whole pixels of about `chunk_pairs` pairs (default: `default_chunk_pairs(device)`, 2^20 on CPU, 2^21
on CUDA); a chunk holds at most chunk_pairs + 2345 pairs (a pixel composites at most 2345). Chunk boundaries are
found for the whole list at once, so the loop over chunks makes no host round trip of its own.

Memory, for someone sizing a run (Q = pairs of one chunk). Figures measured on CPU as growth of peak RSS, float32
model, SH degree 3, float64 statistics; per-pair chunk costs from one chunk holding a view's 1.5 M pairs against
2**16-pair chunks:
- projection: ~300 bytes per Gaussian at its peak (gsplat's torch projection and SH temporaries), per view;
- enumeration keeps the view's pair list, 16 bytes per pair (int64 pixel and row); `find_pairs` bounds its
  candidate buffers to one batch (its docstring states the formula);
- one chunk of `PairStatistics` holds 21 float64 numbers, 3 int64 and a bool per pair (~195 bytes with 3
  colour channels; ~110 in float32) and builds them through a few more; measured growth ~0.25 KB per pair of a
  chunk, i.e. ~0.25 GB for Q = 2**20.
Consumers add their own per-pair and per-Gaussian buffers; `fisher.py` and `importance.py` state theirs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.constants import TILE_SIZE
from nerfstudio_pruning.render.dispatch import enumerate_pairs
from nerfstudio_pruning.render.pairs import Pairs, pair_terms, segment_ends, segmented_cumsum
from nerfstudio_pruning.render.projection import ProjectedGaussians, project
from nerfstudio_pruning.types import Gaussians, Views

# ~0.25 GB of statistics per chunk on CPU, ~0.75 GB with the Fisher terms (docstrings): fits beside a training
# run. On CUDA the float32 statistics take about half as much per pair; twice the pairs, half the launches.
CPU_CHUNK_PAIRS = 1 << 20
CUDA_CHUNK_PAIRS = 1 << 21
# None: `default_chunk_pairs` of the device the statistics are computed on.
DEFAULT_CHUNK_PAIRS: Optional[int] = None

_dtype_override: Optional[torch.dtype] = None


def default_chunk_pairs(device: torch.device) -> int:
    return CUDA_CHUNK_PAIRS if torch.device(device).type == "cuda" else CPU_CHUNK_PAIRS


def pair_statistics_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-pair values: float64 on CPU and for float64 models, float32 for float32 models on CUDA
    (module docstring), unless `statistics_dtype` overrides it."""
    if _dtype_override is not None:
        return _dtype_override
    if model_dtype == torch.float64 or torch.device(device).type != "cuda":
        return torch.float64
    return torch.float32


@contextlib.contextmanager
def statistics_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Compute per-pair statistics in `dtype` inside the block, whatever the device (reductions stay float64)."""
    global _dtype_override
    previous, _dtype_override = _dtype_override, dtype
    try:
        yield
    finally:
        _dtype_override = previous


def project_gaussians(gaussians: Gaussians, views: Views, projector: Callable = project) -> ProjectedGaussians:
    """Project Gaussians exactly as the renderer does (gsplat defaults: eps2d 0.3, near 0.01), returning unpacked
    rows: row k is camera k // N, Gaussian k % N.

    Differentiable: callers wanting plain numbers wrap it in `no_grad`. `projector`: `projection.project` (gsplat's
    torch projection) or another function with its signature and results (`render.compiled.compiled_project`).
    """
    proj, _ = projector(
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh, views.viewmats,
        views.Ks, views.width, views.height, sh_degree=gaussians.sh_degree, rasterize_mode=gaussians.rasterize_mode,
    )
    return proj


def project_and_enumerate(gaussians: Gaussians, views: Views, tile_size: int = TILE_SIZE) -> Tuple[ProjectedGaussians, Pairs]:
    """Projected rows and the pairs they composite in `views`, as plain numbers (no autograd)."""
    with torch.no_grad():
        proj = project_gaussians(gaussians.detach(), views)
        return proj, enumerate_pairs(proj, len(views), views.width, views.height, tile_size)


@dataclass
class PairStatistics:
    """One chunk of pairs (whole pixels only) with everything the pruning scores need, in the dtype of
    `pair_statistics_dtype` (float64 on CPU, float32 on CUDA for a float32 model).

    Gradients are of the pixel value I (per channel) with respect to the pair's Gaussian's projected
    quantities in this view. Where alpha sits on the ALPHA_MAX clamp, alpha does not move with mean2d, conic
    or opacity, so those `dalpha_*` are zero; `dI_dalpha` is still the derivative of I in alpha itself, which
    is what the leave-one-out identity needs.
    """

    pixel: Tensor  # [P] int64, index into the flattened [C, H, W] image stack
    row: Tensor  # [P] int64, index into the ProjectedGaussians rows
    gaussian: Tensor  # [P] int64, Gaussian index
    alpha: Tensor  # [P]
    transmittance: Tensor  # [P], T before the pair
    clamped: Tensor  # [P] bool
    color: Tensor  # [P, D]
    behind: Tensor  # [P, D], S: what is composited behind the pair, background included
    pixel_color: Tensor  # [P, D], the rendered pixel I
    dI_dcolor: Tensor  # [P], T alpha: the same for every channel, no cross-channel terms
    dI_dalpha: Tensor  # [P, D], T c - S / (1 - alpha)
    dalpha_dmean2d: Tensor  # [P, 2]
    dalpha_dconic: Tensor  # [P, 3], order (a, b, c)
    dalpha_dopacity: Tensor  # [P]

    def __len__(self) -> int:
        return int(self.pixel.shape[0])

    def removal_delta(self) -> Tensor:
        """[P, D] exact change of the pixel when this pair's Gaussian alone is removed (opacity set to 0).

        The pixel is affine in the pair's alpha with everything else fixed, so the change is
        -alpha dI/dalpha = alpha S / (1 - alpha) - T alpha c. Exact only while the pixel's list of composited
        pairs is otherwise unchanged: removing a Gaussian raises the transmittance behind it, which can bring
        pairs that the T <= 1e-4 early stop had excluded back into the pixel, and those are not in the list.
        (The 1/255 skip depends on a pair's own alpha only and cannot change.)
        """
        return self.alpha[:, None] * self.behind / (1.0 - self.alpha[:, None]) - (
            (self.transmittance * self.alpha)[:, None] * self.color
        )


def _chunk_bounds(pixel: Tensor, chunk_pairs: int) -> List[Tuple[int, int]]:
    """Split a pixel-sorted pair list into ranges of about `chunk_pairs` pairs that never split a pixel.

    Cuts every `chunk_pairs` pairs, each moved back to the start of its pixel (forward to its end when that
    pixel began before the previous cut: a pixel longer than the budget gets a chunk of its own). All cuts are
    found on the device at once and fetched in one transfer.
    """
    n = int(pixel.shape[0])
    if n <= chunk_pairs:
        return [(0, n)] if n else []
    cut_at = pixel[torch.arange(chunk_pairs, n, chunk_pairs, device=pixel.device)]
    pixel_starts = torch.searchsorted(pixel, cut_at, right=False)
    pixel_ends = torch.searchsorted(pixel, cut_at, right=True)
    bounds, start = [], 0
    for pixel_start, pixel_end in zip(*torch.stack([pixel_starts, pixel_ends]).tolist()):
        end = pixel_start if pixel_start > start else pixel_end
        if end > start:
            bounds.append((start, end))
            start = end
    if start < n:
        bounds.append((start, n))
    return bounds


def _background_per_pixel(
    backgrounds: Optional[Tensor], n_cameras: int, channels: int, like: Tensor, dtype: torch.dtype = torch.float64
) -> Tensor:
    """[C, D] background of each camera; black when none is given."""
    if backgrounds is None:
        return torch.zeros(n_cameras, channels, dtype=dtype, device=like.device)
    bg = backgrounds.detach().to(device=like.device, dtype=dtype)
    if bg.dim() == 1:
        bg = bg[None].expand(n_cameras, -1)
    if bg.shape != (n_cameras, channels):
        raise ValueError(
            f"backgrounds must be [{channels}] or [{n_cameras}, {channels}], got {tuple(backgrounds.shape)}"
        )
    return bg


def iter_pair_statistics(
    proj: ProjectedGaussians, pairs: Pairs, views: Views, chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS
) -> Iterator[PairStatistics]:
    """Statistics of `pairs` (from `project_and_enumerate` on the same views), in chunks of whole pixels.

    Runs under `no_grad` on proj's device; backgrounds come from `views` (black if None).
    """
    n_cameras, width, height, backgrounds = len(views), views.width, views.height, views.backgrounds
    device = proj.means2d.device
    if chunk_pairs is None:
        chunk_pairs = default_chunk_pairs(device)
    dtype = pair_statistics_dtype(device, proj.means2d.dtype)
    with torch.no_grad():
        # One copy of the per-row quantities in the statistics' dtype; per-pair values are recomputed from it.
        proj_work = ProjectedGaussians(
            means2d=proj.means2d.detach().to(dtype),
            conics=proj.conics.detach().to(dtype),
            opacities=proj.opacities.detach().to(dtype),
            depths=proj.depths.detach(),
            radii=proj.radii,
            colors=proj.colors.detach().to(dtype),
            camera_ids=proj.camera_ids,
            gaussian_ids=proj.gaussian_ids,
        )
        channels = proj_work.colors.shape[-1]
        # float64: it joins S in the float64 reduction.
        bg = _background_per_pixel(backgrounds, n_cameras, channels, proj_work.colors)
        pixels_per_camera = width * height
        for start, end in _chunk_bounds(pairs.pixel, chunk_pairs):
            chunk = Pairs(pixel=pairs.pixel[start:end], row=pairs.row[start:end])
            yield _chunk_statistics(proj_work, chunk, width, height, bg, pixels_per_camera)


def _chunk_statistics(
    proj_work: ProjectedGaussians, pairs: Pairs, width: int, height: int, bg: Tensor, pixels_per_camera: int
) -> PairStatistics:
    terms = pair_terms(proj_work, pairs, width, height)
    alpha, transmittance, clamped, starts = terms.alpha, terms.transmittance, terms.clamped, terms.starts
    dtype = alpha.dtype
    rows = pairs.row
    color = proj_work.colors[rows]
    weight = transmittance * alpha

    # Index of the last pair of each pair's pixel: the inclusive sums there are the pixel's totals.
    last_of_pair = segment_ends(pairs.pixel)

    # The reductions, in float64 (segmented_cumsum returns float64): its global cumsum loses about eps64 x
    # (running total); the running total grows by at most max colour per pixel (the weights of a pixel sum to
    # <= 1), so S keeps ~1e-16 x pixels-per-chunk absolute precision before the cast to the statistics' dtype.
    composited_upto = segmented_cumsum(weight[:, None] * color, starts, exclusive=False)
    composited_total = composited_upto[last_of_pair]
    log_t_end = segmented_cumsum(torch.log1p(-alpha), starts, exclusive=False)[last_of_pair]
    background = torch.exp(log_t_end)[:, None] * bg[pairs.pixel // pixels_per_camera]
    del log_t_end, last_of_pair
    behind = (composited_total - composited_upto + background).to(dtype)
    pixel_color = (composited_total + background).to(dtype)
    del composited_upto, composited_total, background

    dI_dalpha = transmittance[:, None] * color - behind / (1.0 - alpha[:, None])

    conic = proj_work.conics[rows]
    a, b, c = conic[:, 0], conic[:, 1], conic[:, 2]
    dx, dy = terms.dx, terms.dy
    active = (~clamped).to(alpha.dtype)
    # d sigma / d mean2d = (a dx + b dy, b dx + c dy) with dx = mean2d - centre, and d alpha = -alpha d sigma.
    alpha_active = alpha * active
    dalpha_dmean2d = -alpha_active[:, None] * torch.stack([a * dx + b * dy, b * dx + c * dy], dim=-1)
    dalpha_dconic = -alpha_active[:, None] * torch.stack([0.5 * dx * dx, dx * dy, 0.5 * dy * dy], dim=-1)
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    dalpha_dopacity = torch.exp(-sigma) * active

    return PairStatistics(
        pixel=pairs.pixel,
        row=rows,
        gaussian=proj_work.gaussian_ids[rows],
        alpha=alpha,
        transmittance=transmittance,
        clamped=clamped,
        color=color,
        behind=behind,
        pixel_color=pixel_color,
        dI_dcolor=weight,
        dI_dalpha=dI_dalpha,
        dalpha_dmean2d=dalpha_dmean2d,
        dalpha_dconic=dalpha_dconic,
        dalpha_dopacity=dalpha_dopacity,
    )


def view_pair_statistics(
    gaussians: Gaussians, views: Views, tile_size: int = TILE_SIZE, chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS
) -> Iterator[PairStatistics]:
    """Project, enumerate and yield statistics for the views given, in chunks of whole pixels.

    Pass one view at a time to keep memory at one view's pair list; a batch works too (pixels then index the
    [C, H, W] stack and `row` the C x N projected rows).
    """
    proj, pairs = project_and_enumerate(gaussians, views, tile_size)
    yield from iter_pair_statistics(proj, pairs, views, chunk_pairs)


def sum_over_pairs(
    proj: ProjectedGaussians,
    pairs: Pairs,
    views: Views,
    num_gaussians: int,
    per_pair: Callable[[PairStatistics], Tensor],
    chunk_pairs: Optional[int] = DEFAULT_CHUNK_PAIRS,
) -> Tensor:
    """[N, ...] float64 sum, over the pairs of each Gaussian, of `per_pair(stats)` ([P, ...] per chunk).

    The one accumulation every score shares: no pixels x Gaussians array is ever formed. Per-pair values are
    widened to float64 before they are added, whatever the statistics' dtype.
    """
    total: Optional[Tensor] = None
    for stats in iter_pair_statistics(proj, pairs, views, chunk_pairs):
        values = per_pair(stats)
        if total is None:
            total = torch.zeros((num_gaussians, *values.shape[1:]), dtype=torch.float64, device=values.device)
        total.index_add_(0, stats.gaussian, values.to(torch.float64))
    if total is None:  # nothing composited: the shape of per_pair's output is unknown, so a zero column
        total = torch.zeros(num_gaussians, dtype=torch.float64, device=proj.means2d.device)
    return total
