"""GPU-kit shim for matplotlib. nerfstudio's utils/colormaps.py imports it at module level (matplotlib.colormaps) to colour depth and accumulation images for the viewer and for eval images; splatfacto's training loss and metrics (PSNR, SSIM) never call it, and ns-prune-compare's plots are not part of the kit. With its dependencies (fonttools, contourpy, kiwisolver, ...) it is about 20 MB. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("matplotlib", "colormapped images (depth, scores) are not available in the kit")
