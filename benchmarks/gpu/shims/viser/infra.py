"""GPU-kit shim for viser.infra (see viser/__init__.py)."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("viser.infra", "the kit runs without the viewer (--vis tensorboard) and without crop boxes")
