"""GPU-kit shim for viser.theme (see viser/__init__.py)."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("viser.theme", "the kit runs without the viewer (--vis tensorboard) and without crop boxes")
