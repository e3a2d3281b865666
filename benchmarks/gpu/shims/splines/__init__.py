"""GPU-kit shim for splines. nerfstudio's viewer/render_panel.py (imported by the trainer with the viewer) imports splines and splines.quaternion at module level for camera-path editing in the viewer, which the kit never starts (--vis tensorboard). Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("splines", "the viewer's camera-path panel is not available in the kit")
