"""GPU-kit shim for open3d (~400 MB). Two uses on the kit's path:

- nerfstudio.scripts.exporter imports open3d at module level for its point cloud, TSDF and Poisson exports;
  `ns-export gaussian-splat` writes its PLY with nerfstudio's own writer (numpy and a file), never open3d.
- nerfstudio-data's `_load_3D_points` reads a capture's seed points (transforms.json's `ply_file_path`, e.g.
  bonsai's sparse_pc.ply) with `open3d.io.read_point_cloud`: `io.py` here reads a PLY's vertices with plyfile into
  float64 points and colours in [0, 1], as open3d gives them.

Anything else raises."""

from _kit_shim import missing_module_getattr

from . import io  # noqa: F401

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("open3d", "only `ns-export gaussian-splat` and io.read_point_cloud (PLY) work in the kit")
