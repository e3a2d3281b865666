"""GPU-kit shim for pathos. nerfstudio's parallel_datamanager.py (registered with the method configs, so imported) imports pathos.helpers.mp at module level for its worker processes; splatfacto, pup-gs and vedal-gs use the full-image datamanager. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("pathos", "the parallel datamanager is not available in the kit")
