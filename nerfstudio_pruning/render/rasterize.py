"""The one rendering entry point: gsplat's CUDA rasterizer on CUDA tensors, a CPU backend elsewhere.

Everything in this package that renders calls `rasterization` from here; nothing else decides which backend
runs. The signature, outputs and `meta` keys are those of `gsplat.rendering.rasterization` (gsplat 1.4.0).

CPU backends, chosen with the environment variable NSP_CPU_RASTERIZER:
- `compiled` (default): numba kernels following gsplat's CUDA kernels (`compiled.py`);
- `torch`: the pure-torch reference (`reference.py`), slow, and the oracle the tests compare against.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
from torch import Tensor

CPU_BACKENDS = ("compiled", "torch")


def cpu_backend() -> str:
    """The CPU rasterizer NSP_CPU_RASTERIZER selects (read at every call, so tests can switch it)."""
    name = os.environ.get("NSP_CPU_RASTERIZER", "compiled").strip().lower() or "compiled"
    if name not in CPU_BACKENDS:
        raise ValueError(f"NSP_CPU_RASTERIZER must be one of {', '.join(CPU_BACKENDS)}, got {name!r}")
    return name


def uses_cuda_backend(means: Tensor) -> bool:
    return means.is_cuda


def uses_compiled_kernels(values: Tensor) -> bool:
    """Whether work on `values` (a model's or a projection's tensors) runs in the compiled CPU kernels.

    CPU tensors while NSP_CPU_RASTERIZER is `compiled`, except float64 ones: the kernels compute in float32, as
    gsplat's CUDA kernels do, and float64 inputs (the exactness tests' brute-force references) keep the
    reference's precision. The one rule the renderer, the pair enumeration and the scores' compiled passes share.
    """
    return not values.is_cuda and cpu_backend() == "compiled" and values.dtype != torch.float64


def rasterization(means: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """Render Gaussians exactly as `gsplat.rendering.rasterization` (same arguments and results)."""
    if uses_cuda_backend(means):
        # Imported here so that CPU-only machines never touch gsplat's CUDA extension loader.
        from gsplat.rendering import rasterization as gsplat_rasterization

        return gsplat_rasterization(means, *args, **kwargs)
    if uses_compiled_kernels(means):
        from nerfstudio_pruning.render.compiled import compiled_rasterization

        return compiled_rasterization(means, *args, **kwargs)
    from nerfstudio_pruning.render.reference import torch_rasterization

    return torch_rasterization(means, *args, **kwargs)
