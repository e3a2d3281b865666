"""GPU-kit shim for rawpy. nerfstudio's process_data_utils (imported by the colmap dataparser) imports it at module level to convert camera RAW files (.cr2) in ns-process-data; the kit reads no RAW images. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("rawpy", "RAW photo conversion (ns-process-data) is not available in the kit")
