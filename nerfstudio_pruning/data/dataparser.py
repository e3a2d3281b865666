"""Dataparser ``nsp-default-scene``: trains on the built-in scene, generating it on first use.

Registered through the ``nerfstudio.dataparser_configs`` entry point, so
``ns-train <method> nsp-default-scene`` works with no data on disk.  It reads
the scene's transforms.json itself (rather than going through nerfstudio's
``nerfstudio-data`` parser) so that seed points come from points.npz and open3d
is never needed.

Importing this module only imports what nerfstudio's own dataparser modules
import; nothing is generated until outputs are requested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import numpy as np
import torch

from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.data import default_scene


@dataclass
class DefaultSceneDataParserConfig(DataParserConfig):
    """The project's procedurally generated default scene."""

    _target: Type = field(default_factory=lambda: DefaultSceneDataParser)
    """target class to instantiate"""
    data: Path = Path("data/nsp-default-scene")
    """Folder of the scene. Generated there on first use if it has no transforms.json;
    an existing scene there is used as is (the generator options below are then ignored)."""
    width: int = 128
    """Image width in pixels (generation only)."""
    height: int = 96
    """Image height in pixels (generation only)."""
    n_views: int = 48
    """Number of views, split over a low and a high camera ring (generation only)."""
    eval_every: int = 8
    """Every eval_every-th view is held out for val/test (generation only)."""
    n_seed_points: int = 4000
    """Number of SfM-like seed points sampled on visible surfaces (generation only)."""
    seed: int = 0
    """Random seed for the seed points (generation only)."""
    auto_scale_poses: bool = True
    """Scale the world so the largest camera coordinate is 1, as nerfstudio-data does by default;
    splatfacto's densification thresholds assume a scene of that size."""
    scale_factor: float = 1.0
    """Extra scale applied on top of the automatic one."""
    load_3D_points: bool = True
    """Pass the seed points to the model (splatfacto initialises its Gaussians from them)."""


@dataclass
class DefaultSceneDataParser(DataParser):
    """Reads the default scene (or any scene written by nerfstudio_pruning.data.default_scene)."""

    config: DefaultSceneDataParserConfig

    def _scene_options(self) -> dict:
        return {name: int(getattr(self.config, name)) for name in default_scene.DEFAULT_SCENE_OPTIONS}

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        requested = self._scene_options()
        root = default_scene.ensure_default_scene(self.config.data, **requested)
        stored = default_scene.read_scene_params(root)
        differing = {k: (stored[k], v) for k, v in requested.items() if k in stored and stored[k] != v}
        if differing and not getattr(self, "_warned_params", False):
            # A scene on disk always wins: regenerating under a running experiment's feet
            # would silently change its data.
            CONSOLE.print(
                f"[bold yellow]Warning: using the existing scene in {root}, made with different options "
                f"(stored, requested) = {differing}. Delete the folder or point --data elsewhere to regenerate."
            )
            self._warned_params = True

        meta = json.loads((root / default_scene.TRANSFORMS_NAME).read_text(encoding="utf-8"))
        frames = meta["frames"]
        names = [frame["file_path"] for frame in frames]

        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown dataparser split {split}")
        if "train_filenames" in meta:
            wanted = meta[f"{split}_filenames"] if f"{split}_filenames" in meta else meta["val_filenames"]
        else:
            # A plain transforms.json without split lists: same interval rule the generator uses.
            train_ids, eval_ids = default_scene.split_indices(len(names), self.config.eval_every)
            wanted = [names[i] for i in (train_ids if split == "train" else eval_ids)]
        if not all(key in meta for key in ("fl_x", "fl_y", "cx", "cy", "w", "h")):
            raise ValueError(f"{root / default_scene.TRANSFORMS_NAME} needs shared intrinsics (fl_x, fl_y, cx, cy, w, h)")
        index_of = {name: i for i, name in enumerate(names)}
        missing = [name for name in wanted if name not in index_of]
        if missing:
            raise RuntimeError(f"{split} split lists files with no frame in transforms.json: {missing[:5]}")
        indices = [index_of[name] for name in wanted]

        c2w = torch.tensor(np.array([frames[i]["transform_matrix"] for i in indices]), dtype=torch.float32)[:, :3, :4]
        all_positions = np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64)[:, :3, 3]
        scale = self.config.scale_factor
        if self.config.auto_scale_poses:
            # Computed over all frames, not just this split, so train and eval share one world.
            scale /= float(np.max(np.abs(all_positions)))
        c2w[:, :3, 3] *= scale

        cameras = Cameras(
            camera_to_worlds=c2w,
            fx=float(meta["fl_x"]),
            fy=float(meta["fl_y"]),
            cx=float(meta["cx"]),
            cy=float(meta["cy"]),
            width=int(meta["w"]),
            height=int(meta["h"]),
            camera_type=CameraType.PERSPECTIVE,
        )

        params = meta.get(default_scene.MARKER_KEY, {})
        aabb = np.array(params.get("aabb", default_scene.SCENE_AABB.tolist()), dtype=np.float64)
        aabb[0] = np.minimum(aabb[0], all_positions.min(axis=0))
        aabb[1] = np.maximum(aabb[1], all_positions.max(axis=0))
        scene_box = SceneBox(aabb=torch.tensor(aabb * scale, dtype=torch.float32))

        metadata = {}
        if self.config.load_3D_points:
            points_path = root / params.get("points_file", default_scene.POINTS_NPZ_NAME)
            if points_path.exists():
                with np.load(points_path, allow_pickle=False) as npz:
                    xyz = np.asarray(npz["xyz"], dtype=np.float32) * np.float32(scale)
                    rgb = np.asarray(npz["rgb"], dtype=np.uint8)
                metadata["points3D_xyz"] = torch.from_numpy(xyz)
                metadata["points3D_rgb"] = torch.from_numpy(rgb)
            else:
                CONSOLE.print(f"[bold yellow]Warning: no {points_path.name} in {root}; splatfacto will start from random points.")

        return DataparserOutputs(
            image_filenames=[root / names[i] for i in indices],
            cameras=cameras,
            scene_box=scene_box,
            dataparser_scale=scale,
            dataparser_transform=torch.eye(4, dtype=torch.float32)[:3, :],
            metadata=metadata,
        )


default_scene_dataparser = DataParserSpecification(
    config=DefaultSceneDataParserConfig(),
    description="Built-in procedural test scene (textured objects on a tiled floor), generated on first use; no download.",
)
