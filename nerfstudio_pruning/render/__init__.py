"""Rendering: the one entry point (`rasterization`), the shared projection, pair enumeration and CPU backends.

Plain torch (and numba for the compiled CPU kernels); nothing here imports nerfstudio. Modules, lowest first:
`constants` and `backend` (leaves: gsplat's thresholds; which backend runs on given tensors), `projection`,
`pairs` (enumeration only), `frontend` (gsplat's signature around a CPU backend), `reference` and `compiled`
(the two CPU backends; `cpu/` holds the numba kernels), and `dispatch`, which hands work to a backend.
"""

from nerfstudio_pruning.render.dispatch import enumerate_pairs, rasterization

__all__ = ["enumerate_pairs", "rasterization"]
