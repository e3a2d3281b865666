"""GPU-kit shim for fpsample (a compiled extension). nerfstudio's full-image datamanager imports it at module
level for `train_cameras_sampling_strategy="fps"`; the kit's methods keep the default ("random"). Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("fpsample", "only the default camera sampling strategy ('random') works in the kit")
