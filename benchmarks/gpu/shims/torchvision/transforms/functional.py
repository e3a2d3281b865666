"""GPU-kit shim for torchvision.transforms.functional (see torchvision/__init__.py)."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("torchvision.transforms.functional", "the viewer is not used by the kit")
