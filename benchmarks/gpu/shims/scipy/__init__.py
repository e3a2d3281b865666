"""GPU-kit shim for scipy. nerfstudio's viewer/render_panel.py (imported by the trainer) does `from scipy import interpolate` at module level for camera-path interpolation in the viewer, which the kit never starts; about 35 MB. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("scipy", "the viewer's camera-path panel is not available in the kit")
