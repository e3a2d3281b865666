"""GPU-kit shim for pathos.helpers (see pathos/__init__.py): `mp.Process` is a plain stand-in class."""

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("pathos.helpers", "the parallel datamanager is not available in the kit")
