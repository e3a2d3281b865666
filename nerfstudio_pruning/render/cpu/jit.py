"""The one set of numba options every CPU kernel is compiled with, as three decorators.

- cache: compiled once into `__pycache__` and loaded by later processes (tests/test_compiled_rasterizer.py checks
  that a fresh process recompiles nothing). numba checks only the cached function's own file for changes: after
  editing an inlined helper in another module, delete the `*.nbi`/`*.nbc` files of the modules that call it.
- error_model="numpy": a division by zero gives inf or nan instead of raising, so the hot loops carry no checks.
- fastmath stays off (numba's default): per-pair values must follow the reference's order of operations.
"""

from __future__ import annotations

from numba import njit

OPTIONS = {"cache": True, "error_model": "numpy"}

kernel = njit(**OPTIONS)  # serial
parallel_kernel = njit(parallel=True, **OPTIONS)  # prange loops run on numba's threads (launch.py)
inline = njit(inline="always", **OPTIONS)  # inlined into its callers at numba's IR level
