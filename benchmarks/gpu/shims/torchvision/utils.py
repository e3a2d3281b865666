"""GPU-kit shim for torchvision.utils (see torchvision/__init__.py)."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("torchvision.utils", "ns-eval without --render-output-path")
