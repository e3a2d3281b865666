"""GPU-kit shim for skimage. scikit-image: nerfstudio's exporter/tsdf_utils.py and marching_cubes.py (imported by nerfstudio.scripts.exporter) do `from skimage import measure` at module level for marching cubes; ns-export gaussian-splat exports no mesh. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("skimage", "mesh export (marching cubes) is not available in the kit")
