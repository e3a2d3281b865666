"""Which backend runs work on given tensors: the one rule every renderer, pair enumeration and score asks.

- CUDA tensors: gsplat's CUDA kernels (`Backend.GSPLAT`);
- other tensors: the CPU backend the environment variable NSP_CPU_RASTERIZER selects, `compiled` (default: the
  numba kernels of `render/cpu/`) or `torch` (the pure-torch reference, slow, the oracle the tests compare
  against); float64 tensors always take the reference: the kernels compute in float32, as gsplat's CUDA kernels
  do, and float64 inputs (the exactness tests' brute-force references) keep the reference's precision.

The scores' per-Gaussian statistics (`scores_fused`): the fused Triton kernels of `scoring/fused/` where gsplat's
CUDA kernels run (and triton is installed); elsewhere the backend above (the compiled moments, the per-pair
statistics). Inside `fused_scores_on_cpu()` CPU tensors take the fused kernels too, under Triton's interpreter:
slow, for the tests and the GPU benchmark's dry run.

A leaf module: it decides, `render/dispatch.py` and the scores act on the answer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from enum import Enum
from typing import Iterator

import torch
from torch import Tensor


class Backend(str, Enum):
    GSPLAT = "gsplat"  # gsplat's CUDA kernels
    COMPILED = "compiled"  # the numba CPU kernels
    TORCH = "torch"  # the pure-torch reference

    def __str__(self) -> str:
        return self.value


CPU_BACKENDS = (Backend.COMPILED.value, Backend.TORCH.value)


def cpu_backend() -> str:
    """The CPU rasterizer NSP_CPU_RASTERIZER selects (read at every call, so tests can switch it)."""
    name = os.environ.get("NSP_CPU_RASTERIZER", "compiled").strip().lower() or "compiled"
    if name not in CPU_BACKENDS:
        raise ValueError(f"NSP_CPU_RASTERIZER must be one of {', '.join(CPU_BACKENDS)}, got {name!r}")
    return name


def on_gpu(values: Tensor) -> bool:
    """Whether `values` live where gsplat's CUDA kernels run."""
    return values.is_cuda


def backend_for(values: Tensor) -> Backend:
    """The backend that runs work on `values` (a model's or a projection's tensors); see the module docstring."""
    if on_gpu(values):
        return Backend.GSPLAT
    if cpu_backend() == Backend.COMPILED.value and values.dtype != torch.float64:
        return Backend.COMPILED
    return Backend.TORCH


_fused_scores_on_cpu = False


def scores_fused(values: Tensor) -> bool:
    """Whether the scores' per-Gaussian statistics on `values` (a model's tensors) run in the fused Triton kernels
    (`scoring/fused/`); see the module docstring."""
    if on_gpu(values):
        return importlib.util.find_spec("triton") is not None
    return _fused_scores_on_cpu


@contextlib.contextmanager
def fused_scores_on_cpu() -> Iterator[None]:
    """Inside the block, scores on CPU tensors take the fused kernels under Triton's interpreter (tiny scenes only)."""
    global _fused_scores_on_cpu
    previous, _fused_scores_on_cpu = _fused_scores_on_cpu, True
    try:
        yield
    finally:
        _fused_scores_on_cpu = previous
