"""Fused per-view scoring statistics: one Triton kernel launch per view walks gsplat's tile lists and accumulates
a score's per-Gaussian statistic on the device (`kernels.py` describes the walk).

Why: on CUDA the per-pair torch pipeline (`pair_stats.py`) enumerates and materialises every (pixel, Gaussian)
pair in chunks, thousands of launches per view (docs/cuda_path.md sections 7-8). Here one program per tile holds
its pixels in registers and writes one atomic per (tile, Gaussian) and column, so a view costs two walks over the
tile lists gsplat's forward pass already builds, and memory is the tile lists (what a gsplat render holds: ~12
bytes per tile intersection, plus its sort), an entry table of 32 bytes per intersection and the per-Gaussian
output: nothing per pair.

Where it runs: the backend policy says (`render.backend.scores_fused`): CUDA tensors, where triton is importable.
CPU tensors keep the compiled numba passes and the per-pair torch statistics, the references these kernels are
tested against; inside `render.backend.fused_scores_on_cpu()` (tests, `bench_fused_scoring.py --dry-run`) CPU
tensors take the fused path too, through Triton's interpreter. The interpreter is not switched on process-wide:
`TRITON_INTERPRET` is read when a `@triton.jit` function is defined, so a second copy of `kernels.py` is loaded
with it on (`_load_kernels(interpret=True)`) and only that copy is used for CPU tensors; the compiled copy stays
what CUDA launches.

Tile lists: gsplat's `isect_tiles` / `isect_offset_encode` (`gsplat.cuda._wrapper`) on CUDA, their pure-torch
twins in `gsplat.cuda._torch_impl` on CPU (the same ids and depth order by their source;
`benchmarks/gpu/bench_fused_scoring.py` compares them on a GPU).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.projection import ProjectedGaussians

STATISTICS = ("moments", "leave_one_out", "transmittance", "speedy")
# Warps per program (one program per tile): one lane per pixel. The benchmark may set other values to compare.
NUM_WARPS = {16: 8, 8: 2}
_LOSS_CODES = {"l1": 0, "l2": 1, "energy": 2}  # kernels.LOSS_L1, LOSS_L2, LOSS_ENERGY

_kernel_modules: dict = {}


def _load_kernels(interpret: bool) -> ModuleType:
    """`kernels.py`, its `@triton.jit` functions compiled (GPU) or interpreted (CPU): two module objects, so each
    copy's helpers resolve to functions of its own kind."""
    if interpret in _kernel_modules:
        return _kernel_modules[interpret]
    if not interpret:
        from nerfstudio_pruning.scoring.fused import kernels

        _kernel_modules[False] = kernels
        return kernels
    from triton import knobs

    name = __name__ + "._kernels_interpreted"
    spec = importlib.util.find_spec(__name__ + ".kernels")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, spec.origin))
    previous = knobs.runtime.interpret
    knobs.runtime.interpret = True
    try:
        sys.modules[name] = module
        module.__spec__.loader.exec_module(module)
    finally:
        knobs.runtime.interpret = previous
    from triton.runtime.interpreter import InterpretedFunction

    # A device function called through its InterpretedFunction re-patches triton.language on every call (~1 ms, most
    # of a tiny scene's time); the launched kernel has patched it for the whole grid already, so its helpers are
    # handed over as the plain rewritten functions.
    for attribute, value in list(vars(module).items()):
        if isinstance(value, InterpretedFunction) and attribute != "fused_tile_kernel":
            setattr(module, attribute, value.rewrite())
    _kernel_modules[True] = module
    return module


def _tile_lists(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_w: int, tile_h: int
) -> Tuple[Tensor, Tensor]:
    """(offsets [n_tiles + 1] int32, flatten_ids [I] int32): gsplat's depth-sorted tile lists of one camera."""
    if means2d.is_cuda:
        from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles
    else:
        from gsplat.cuda._torch_impl import _isect_offset_encode as isect_offset_encode
        from gsplat.cuda._torch_impl import _isect_tiles as isect_tiles
    _, isect_ids, flatten_ids = isect_tiles(means2d[None], radii[None], depths[None], tile_size, tile_w, tile_h)
    offsets = isect_offset_encode(isect_ids, 1, tile_w, tile_h).reshape(-1)
    ends = torch.full((1,), flatten_ids.shape[0], dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, ends]).int().contiguous(), flatten_ids.int().contiguous()


def fused_view_statistic(
    statistic: str,
    proj: ProjectedGaussians,
    width: int,
    height: int,
    tile_size: int = 16,
    background: Optional[Tensor] = None,
    gt_image: Optional[Tensor] = None,
    loss: str = "energy",
    value_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """[rows, K] float64 per-row sums of `statistic` over the pairs one camera composites (rows = the projection's
    rows, one camera, unpacked: row i is Gaussian i).

    K: `moments` 21 + 6 D + 1 (PUP's compact M); the others 1 (`leave_one_out`: the loss change under `loss`
    against `gt_image` [H, W, D]; `transmittance`: sum of T before each pair; `speedy`: Speedy-Splat's squared
    footprint gradient). `value_dtype`: what the per-pixel values and the per-tile sums are computed in (float64
    matches the CPU references to rounding; float32 is the faster GPU variant the benchmark measures).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if loss not in _LOSS_CODES:
        raise ValueError(f"loss must be one of {', '.join(_LOSS_CODES)}, got {loss!r}")
    if statistic == "leave_one_out" and loss != "energy" and gt_image is None:
        raise ValueError(f"loss={loss!r} needs a ground-truth image")
    if proj.camera_ids.numel() and bool((proj.camera_ids != 0).any()):
        raise ValueError("fused statistics take one camera at a time")
    import triton.language as tl

    kernels = _load_kernels(interpret=not proj.means2d.is_cuda)
    device = proj.means2d.device
    rows, channels = proj.colors.shape
    n_cols = 21 + 6 * channels + 1 if statistic == "moments" else 1
    out = torch.zeros(rows, n_cols, dtype=torch.float64, device=device)
    tile_w, tile_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    offsets, flatten_ids = _tile_lists(
        proj.means2d.float().contiguous(), proj.radii.int().contiguous(), proj.depths.float().contiguous(),
        tile_size, tile_w, tile_h,
    )
    if flatten_ids.shape[0] == 0:
        return out
    bg = torch.zeros(channels, dtype=torch.float32, device=device) if background is None else background
    bg = bg.detach().reshape(-1).float().contiguous()
    if bg.shape[0] != channels:
        raise ValueError(f"background must have {channels} channels, got {tuple(background.shape)}")
    if gt_image is None:
        gt = bg  # never read
    else:
        if tuple(gt_image.shape) != (height, width, channels):
            raise ValueError(f"gt_image must be [{height}, {width}, {channels}], got {tuple(gt_image.shape)}")
        # float64 images stay float64: the residual is formed in the value dtype, as the references form it
        gt = gt_image.detach().to(torch.float64 if gt_image.dtype == torch.float64 else torch.float32).contiguous()
    code = {"moments": kernels.MOMENTS, "leave_one_out": kernels.LEAVE_ONE_OUT,
            "transmittance": kernels.TRANSMITTANCE, "speedy": kernels.SPEEDY}[statistic].value
    means2d = proj.means2d.detach().float()
    # Each entry's row values at the entry's position (32 bytes per tile-list entry): `kernels._load_entry`.
    rows_table = torch.cat([means2d, proj.conics.detach().float(), proj.opacities.detach().float()[:, None],
                            means2d.new_zeros(rows, 2)], dim=1)
    entries = rows_table[flatten_ids.long()].contiguous()
    del rows_table
    kernels.fused_tile_kernel[(tile_w * tile_h,)](
        offsets, flatten_ids, entries, proj.colors.detach().float().contiguous(), bg, gt, out,
        n_cols, width, height, tile_w,
        D=channels, DPAD=triton_next_power_of_2(channels), TILE=tile_size, STAT=code, LOSS=_LOSS_CODES[loss],
        VT=tl.float64 if value_dtype == torch.float64 else tl.float32,
        num_warps=NUM_WARPS.get(tile_size, 4),
        enable_fp_fusion=False,  # the float32 alpha test as the CPU kernels evaluate it, without contracted FMAs
    )
    return out


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
