"""Rendering: the one entry point (`rasterization`), the shared projection, pair enumeration and CPU backends.

Plain torch (and numba for the compiled CPU kernel); nothing here imports nerfstudio.
"""

from nerfstudio_pruning.render.rasterize import rasterization

__all__ = ["rasterization"]
