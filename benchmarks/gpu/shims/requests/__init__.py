"""GPU-kit shim for requests (with urllib3, idna, charset-normalizer and certifi). nerfstudio's colmap_utils
imports it at module level to download COLMAP vocabulary trees (ns-process-data); the GPU machine has no
network and the kit's path downloads nothing. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("requests", "the GPU machine has no network")
