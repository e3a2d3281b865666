"""GPU-kit shim for xatlas. nerfstudio's exporter/texture_utils.py (imported by nerfstudio.scripts.exporter) imports it at module level to unwrap mesh UVs; ns-export gaussian-splat exports no mesh. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("xatlas", "mesh texturing (ns-export poisson/tsdf/marching-cubes) is not available in the kit")
