"""GPU-kit shim for splines.quaternion (see splines/__init__.py)."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("splines.quaternion", "the viewer's camera-path panel is not available in the kit")
