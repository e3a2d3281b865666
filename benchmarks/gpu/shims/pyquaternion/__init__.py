"""GPU-kit shim for pyquaternion. nerfstudio's nuscenes_dataparser (registered, so imported, with every dataparser) imports it at module level; only the nuScenes dataparser uses it. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("pyquaternion", "the nuScenes dataparser is not available in the kit")
