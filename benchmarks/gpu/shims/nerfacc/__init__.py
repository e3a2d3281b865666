"""GPU-kit shim for nerfacc. nerfstudio's model_components/renderers.py and the NeRF models (imported with the method configs and by the viewer) import it at module level for ray marching and volume rendering; Gaussian splatting (splatfacto, pup-gs, vedal-gs) never calls it. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("nerfacc", "NeRF ray marching (nerfacto, instant-ngp, ...) is not available in the kit")
