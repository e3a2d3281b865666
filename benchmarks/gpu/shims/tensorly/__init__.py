"""GPU-kit shim for tensorly (~7 MB). nerfstudio's splatfacto imports model_components/lib_bilagrid.py, which
imports tensorly at module level for its bilateral-grid total-variation loss; splatfacto uses it only with
`use_bilateral_grid=True` (the default and the kit's setting is False). Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("tensorly", "splatfacto's bilateral grid (use_bilateral_grid) is not available in the kit")


def set_backend(backend: str) -> None:
    """lib_bilagrid calls `tl.set_backend("pytorch")` at import: accepted and ignored."""
