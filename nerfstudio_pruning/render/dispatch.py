"""Where rendering work is handed to a backend: `rasterization` and `enumerate_pairs`.

Both act on `backend.backend_for`, the one rule for which backend runs on given tensors (the scores' compiled
passes ask the same rule, in `scoring/fisher.py`):
- gsplat: gsplat's CUDA rasterizer, and its tile lists and `rasterize_to_indices_in_range` kernel for the pairs;
- compiled: the numba CPU kernels (`compiled.py`, `cpu/`);
- torch: the pure-torch reference (`reference.py`, `pairs.find_pairs`).
`rasterization`'s signature, outputs and `meta` keys are those of `gsplat.rendering.rasterization` (gsplat 1.4.0).

The backends are imported when first used: CPU-only machines then never touch gsplat's CUDA extension loader,
and processes that render on CUDA or with the reference never load numba's kernels.
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

from nerfstudio_pruning.render.backend import Backend, backend_for
from nerfstudio_pruning.render.constants import TILE_SIZE
from nerfstudio_pruning.render.pairs import Pairs, find_pairs
from nerfstudio_pruning.render.projection import ProjectedGaussians
from nerfstudio_pruning.render.reference import torch_rasterization


def rasterization(means: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """Render Gaussians exactly as `gsplat.rendering.rasterization` (same arguments and results)."""
    backend = backend_for(means)
    if backend == Backend.GSPLAT:
        from gsplat.rendering import rasterization as gsplat_rasterization  # CUDA side: imported only where it runs

        return gsplat_rasterization(means, *args, **kwargs)
    if backend == Backend.COMPILED:
        from nerfstudio_pruning.render.compiled import compiled_rasterization  # loads numba and its kernels

        return compiled_rasterization(means, *args, **kwargs)
    return torch_rasterization(means, *args, **kwargs)


def enumerate_pairs(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = TILE_SIZE
) -> Pairs:
    """Every (pixel, row) pair the rasterizer composites, sorted by pixel and front to back within a pixel.

    The one place pairs are enumerated for the scores, by the backend that renders: the compiled kernels' tile
    lists, gsplat's kernel, or the torch path of `find_pairs`.
    """
    backend = backend_for(proj.means2d)
    if backend == Backend.COMPILED:
        from nerfstudio_pruning.render.compiled import compiled_find_pairs  # loads numba and its kernels

        return compiled_find_pairs(proj, n_cameras, width, height, tile_size)
    return find_pairs(proj, n_cameras, width, height, tile_size, backend=backend.value)
