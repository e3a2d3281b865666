"""The numba kernels of the compiled CPU backend, on numpy arrays; `render/compiled.py` is their torch side.

`projection` (gsplat's pinhole projection and SH colours, forward and backward), `binning` (tile lists sorted by
depth), `compositing` (forward and backward passes over the tile lists); `jit` holds the numba options every
kernel is compiled with, `launch` the threads and the lock they run under. PUP's gradient-moment kernels, which
walk the same tile lists, are scoring and live in `scoring/cpu_moments.py`.
"""

from nerfstudio_pruning.render.cpu.binning import bin_rows, prepare_rows, sort_tiles
from nerfstudio_pruning.render.cpu.compositing import backward_tiles, rasterize_tiles, reduce_rows
from nerfstudio_pruning.render.cpu.projection import project_backward, project_forward, projection_jacobian_rows

__all__ = [
    "backward_tiles", "bin_rows", "prepare_rows", "project_backward", "project_forward", "projection_jacobian_rows",
    "rasterize_tiles", "reduce_rows", "sort_tiles",
]
