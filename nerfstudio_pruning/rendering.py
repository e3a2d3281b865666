"""The one rendering entry point: gsplat's CUDA rasterizer on CUDA tensors, the pure-torch path elsewhere.

Everything in this package that renders calls `rasterization` from here; nothing else decides which backend
runs. The signature, outputs and `meta` keys are those of `gsplat.rendering.rasterization` (gsplat 1.4.0).
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

from nerfstudio_pruning.cpu_rasterizer import cpu_rasterization


def uses_cuda_backend(means: Tensor) -> bool:
    return means.is_cuda


def rasterization(means: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """Render Gaussians exactly as `gsplat.rendering.rasterization` (same arguments and results)."""
    if uses_cuda_backend(means):
        # Imported here so that CPU-only machines never touch gsplat's CUDA extension loader.
        from gsplat.rendering import rasterization as gsplat_rasterization

        return gsplat_rasterization(means, *args, **kwargs)
    return cpu_rasterization(means, *args, **kwargs)
