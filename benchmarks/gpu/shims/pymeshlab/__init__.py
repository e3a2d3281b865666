"""GPU-kit shim for pymeshlab. nerfstudio's exporter_utils.py and tsdf_utils.py (imported by nerfstudio.scripts.exporter) import it at module level for mesh clean-up; ns-export gaussian-splat exports no mesh. About 60 MB. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("pymeshlab", "mesh export is not available in the kit")
