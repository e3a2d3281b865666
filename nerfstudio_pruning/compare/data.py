"""The dataset of `ns-prune-compare`: recognise a scene folder, check it, and build its `ns-train` dataparser arguments.

`--scene default` is the built-in scene. A folder is read by nerfstudio-data (a `transforms.json`; through our
`nerfstudio-data-cached`, which keeps downscaled copies out of the dataset), colmap (`sparse/0` or
`colmap/sparse/0` beside `images/`) or blender-data (`transforms_train.json`, `_val`, `_test`). A dataset without
seed points trains from random Gaussians (`--pipeline.model.random-init True`), and the comparison says so.

Everything here only reads the dataset: a bad scene raises `SceneError` (one line) before anything is trained or
written. Downscaled colmap images are made in the same cache `nerfstudio-data-cached` uses, never in the dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

DATAPARSERS = ("auto", "nerfstudio-data", "colmap", "blender-data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"}
# nerfstudio's colmap parser picks the downscale so that the longer side is at most this many pixels.
MAX_AUTO_RESOLUTION = 1600


class SceneError(Exception):
    """A scene that cannot be compared on; the message is one line."""


@dataclass
class Scene:
    name: str
    """'default' or the dataset folder, as given."""
    dataparser: str
    """nsp-default-scene, nerfstudio-data, colmap or blender-data."""
    args: List[str]
    """The dataparser subcommand and its options, last on the ns-train command line."""
    random_init: bool = False
    """No seed points: splatfacto starts from random Gaussians."""
    notes: List[str] = field(default_factory=list)


def _colmap_dir(data: Path) -> Optional[Path]:
    for rel in ("sparse/0", "colmap/sparse/0"):
        if (data / rel).is_dir():
            return data / rel
    return None


def detect(data: Path) -> Optional[str]:
    """The dataparser a dataset folder is written for, or None."""
    if (data / "transforms.json").is_file():
        return "nerfstudio-data"
    if _colmap_dir(data) is not None:
        return "colmap"
    if (data / "transforms_train.json").is_file():
        return "blender-data"
    return None


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SceneError(f"cannot read {path}: {err}".replace("\n", " ")) from None
    if not isinstance(meta, dict):
        raise SceneError(f"{path} is not a JSON object")
    return meta


def _check_frames(listing: Path, files: List[Path]) -> None:
    if not files:
        raise SceneError(f"{listing} lists no images")
    missing = [f for f in files if not f.is_file()]
    if len(missing) == len(files):
        raise SceneError(f"none of the {len(files)} images {listing} lists exists (the first: {missing[0]})")
    if missing:
        raise SceneError(f"{len(missing)} of the {len(files)} images {listing} lists are missing (the first: {missing[0]})")


def resolve_scene(scene: str, dataparser: str = "auto", downscale_factor: Optional[int] = None,
                  default_scene_dir: Optional[Path] = None, check_only: bool = False) -> Scene:
    """Check the scene and return how to train on it. `default_scene_dir` is where the built-in scene goes.
    With check_only, nothing is written (no downscaled copies are made)."""
    if dataparser not in DATAPARSERS:
        raise SceneError(f"--dataparser must be one of {', '.join(DATAPARSERS)}, got {dataparser!r}")
    if downscale_factor is not None and downscale_factor < 1:
        raise SceneError(f"--downscale-factor must be at least 1, got {downscale_factor}")
    if scene == "default":
        if dataparser != "auto":
            raise SceneError("--dataparser applies to a dataset folder, not to the built-in scene ('default')")
        folder = str(default_scene_dir or "data/nsp-default-scene")
        return Scene("default", "nsp-default-scene", ["nsp-default-scene", "--data", folder])

    data = Path(scene).expanduser()
    if not data.exists():
        raise SceneError(f"scene folder {scene} does not exist")
    if not data.is_dir():
        raise SceneError(f"--scene {scene} is not a folder (give the dataset folder, or 'default')")
    data = data.resolve()
    found = detect(data)
    kind = found if dataparser == "auto" else dataparser
    if kind is None:
        raise SceneError(f"{data} holds no recognisable dataset: no transforms.json (nerfstudio-data), sparse/0 or "
                         "colmap/sparse/0 (colmap), or transforms_train.json (blender-data)")
    if kind == "nerfstudio-data":
        return _nerfstudio(data, downscale_factor)
    if kind == "colmap":
        return _colmap(data, downscale_factor, check_only)
    return _blender(data, downscale_factor)


def _nerfstudio(data: Path, downscale_factor: Optional[int]) -> Scene:
    listing = data / "transforms.json"
    if not listing.is_file():
        raise SceneError(f"{data} has no transforms.json for --dataparser nerfstudio-data")
    meta = _read_json(listing)
    frames = meta.get("frames") or []
    _check_frames(listing, [data / str(f.get("file_path", "")) for f in frames if isinstance(f, dict)])
    args = ["nerfstudio-data-cached", "--data", str(data)]
    if downscale_factor:
        args += ["--downscale-factor", str(downscale_factor)]
    ply = meta.get("ply_file_path")
    random_init = not (ply and (data / ply).is_file())
    notes = []
    if random_init:
        # Without a ply_file_path nerfstudio-data would ask on the terminal whether to convert colmap points.
        args += ["--load-3D-points", "False"]
        notes.append(f"{listing.name} names no seed point cloud (ply_file_path): random init")
    return Scene(str(data), "nerfstudio-data", args, random_init, notes)


def _colmap(data: Path, downscale_factor: Optional[int], check_only: bool) -> Scene:
    sparse = _colmap_dir(data)
    if sparse is None:
        raise SceneError(f"{data} has no sparse/0 or colmap/sparse/0 for --dataparser colmap")
    if not any((sparse / f"cameras.{ext}").is_file() and (sparse / f"images.{ext}").is_file() for ext in ("bin", "txt")):
        raise SceneError(f"{sparse} holds no colmap reconstruction (cameras.bin and images.bin, or .txt)")
    images_dir = data / "images"
    images = sorted(p for p in images_dir.iterdir() if p.suffix in IMAGE_SUFFIXES) if images_dir.is_dir() else []
    if not images:
        raise SceneError(f"{data} has no images in images/ for its colmap reconstruction")
    random_init = not any((sparse / f"points3D.{ext}").is_file() for ext in ("bin", "txt"))
    factor = downscale_factor
    if factor is None:
        from PIL import Image

        with Image.open(images[0]) as im:
            longest = max(im.size)
        factor = 1
        while longest / factor > MAX_AUTO_RESOLUTION:
            factor *= 2
    notes = []
    root = data
    if factor > 1 and not (data / f"images_{factor}").is_dir():
        # nerfstudio's colmap parser would ask on the terminal and write images_<factor>/ into the dataset.
        if not check_only:
            from nerfstudio_pruning.data.cached_dataparser import default_cache_root, downscaled_mirror

            root = downscaled_mirror(data, factor, default_cache_root())
            notes.append(f"colmap images downscaled by {factor} into the cache {root} (the dataset is not written)")
    args = ["colmap", "--data", str(root), "--colmap-path", str(sparse.relative_to(data)),
            "--downscale-factor", str(factor)]
    if random_init:
        args += ["--load-3D-points", "False"]
        notes.append(f"{sparse} has no points3D: random init")
    return Scene(str(data), "colmap", args, random_init, notes)


def _blender(data: Path, downscale_factor: Optional[int]) -> Scene:
    if downscale_factor not in (None, 1):
        raise SceneError("blender-data has no downscale option; leave out --downscale-factor for this scene")
    for split in ("train", "val", "test"):
        listing = data / f"transforms_{split}.json"
        if not listing.is_file():
            raise SceneError(f"{data} has no {listing.name} (blender-data reads train, val and test)")
        meta = _read_json(listing)
        if "camera_angle_x" not in meta:
            raise SceneError(f"{listing} has no camera_angle_x")
        frames = meta.get("frames") or []
        _check_frames(listing, [data / (str(f.get("file_path", "")).replace("./", "") + ".png")
                                for f in frames if isinstance(f, dict)])
    # blender-data never has seed points.
    return Scene(str(data), "blender-data", ["blender-data", "--data", str(data)], True,
                 ["blender-data has no seed points: random init"])
