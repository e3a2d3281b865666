"""`open3d.io.read_point_cloud(path)` for a PLY of vertices (x, y, z and optionally red, green, blue as uchar), the
one call nerfstudio-data makes: points as float64 [N, 3] and colours as float64 in [0, 1] (value / 255), as open3d
stores them, so that nerfstudio's `(np.asarray(pcd.colors) * 255).astype(np.uint8)` gives what it gives with
open3d. Other formats and other functions of open3d.io raise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _kit_shim import missing_module_getattr

__getattr__ = missing_module_getattr("open3d.io", "only read_point_cloud of a PLY is provided")


class PointCloud:
    def __init__(self, points: np.ndarray, colors: np.ndarray) -> None:
        self.points, self.colors = points, colors

    def has_colors(self) -> bool:
        return len(self.colors) > 0


def read_point_cloud(filename, format: str = "auto", **kwargs) -> PointCloud:  # noqa: A002 - open3d's name
    path = Path(filename)
    if format not in ("auto", "ply") or (format == "auto" and path.suffix.lower() != ".ply"):
        raise RuntimeError(f"open3d.io.read_point_cloud({filename!r}): the GPU-kit shim reads PLY files only")
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = vertex.data.dtype.names
    points = np.stack([np.asarray(vertex[c], dtype=np.float64) for c in ("x", "y", "z")], axis=-1)
    if all(c in names for c in ("red", "green", "blue")):
        colors = np.stack([np.asarray(vertex[c], dtype=np.float64) for c in ("red", "green", "blue")], axis=-1) / 255.0
    else:
        colors = np.zeros((0, 3))
    return PointCloud(points, colors)
