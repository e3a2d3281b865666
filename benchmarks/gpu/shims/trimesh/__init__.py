"""GPU-kit shim for trimesh. nerfstudio's exporter/marching_cubes.py (imported by nerfstudio.scripts.exporter) imports it at module level; ns-export gaussian-splat exports no mesh. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("trimesh", "mesh export (marching cubes) is not available in the kit")
