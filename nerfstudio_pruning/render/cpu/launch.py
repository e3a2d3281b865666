"""Running the numba kernels from torch: threads, the launch lock, and arrays handed between torch and numpy.

Threads: each launch sets numba's thread count to `torch.get_num_threads()` (capped at numba's maximum), so one
knob controls both libraries. numba runs on its OpenMP threading layer where available (unless
NUMBA_THREADING_LAYER says otherwise), sharing torch's libgomp pool, so that torch's idle OpenMP threads do not
spin against numba's; torch's thread count is restored if numba's first launch changed it. Kernel calls are
serialised by a lock: the workqueue fallback aborts the process on concurrent parallel launches, e.g. a viewer
thread rendering while training.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch
from torch import Tensor

# numba runs its kernels on its OpenMP layer where it can, because on Linux that is the libgomp torch already
# loaded: one pool of threads for both. With a pool of its own (the workqueue layer), torch's OpenMP threads keep
# spinning for a while after each torch operation and take the cores from numba's threads: a training step at
# 170k Gaussians took 102-115 ms with workqueue and 75-90 ms with the OpenMP layer (2 cores, docs/compiled_rasterizer.md).
# The shared pool has one catch, handled in `launch`: numba's first parallel launch sizes the pool with
# omp_set_num_threads, which is torch's thread count too. NUMBA_THREADING_LAYER, when set, wins; without OpenMP
# (e.g. a numba build without it) numba falls back to workqueue, whose concurrent launches KERNEL_LOCK rules out.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
KERNEL_LOCK = threading.Lock()
# Tiles differ a lot in work (the centre of a view holds most pairs): handing them out one at a time keeps all
# threads busy where numba's default static split into equal ranges would leave one idle. Row kernels keep the
# static split (even work per row; dynamic scheduling of single rows costs more than it balances).
TILE_CHUNK = 1


def numba_threads() -> int:
    """The thread count the kernels use: torch's, capped at what numba was started with."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def launch(kernel, *args, chunk: int = 0) -> None:
    """Run a parallel kernel on `numba_threads()` threads; `chunk` > 0 hands out iterations dynamically."""
    with KERNEL_LOCK:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(numba_threads())
        with numba.parallel_chunksize(chunk):
            kernel(*args)
        if torch.get_num_threads() != torch_threads:  # the OpenMP pool was just created at numba's size
            torch.set_num_threads(torch_threads)


def as_numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A contiguous CPU numpy copy (or view) of `t` in `dtype`, detached."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def as_float32(t: Tensor) -> np.ndarray:
    return as_numpy(t, torch.float32)
