"""GPU-kit shim for open3d (~400 MB). nerfstudio.scripts.exporter imports open3d at module level for its point
cloud, TSDF and Poisson exports; `ns-export gaussian-splat` writes its PLY with nerfstudio's own writer
(ExportGaussianSplat.write_ply: numpy and a file), never open3d. Any call raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("open3d", "only `ns-export gaussian-splat` works in the kit")
