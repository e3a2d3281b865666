"""The built-in default scene and the nsp-default-scene dataparser."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerfstudio_pruning.data import default_scene as S

# One pytest-xdist worker runs this module: its module-scoped fixtures are made once.
pytestmark = pytest.mark.xdist_group("default-scene")

# Small enough to generate in a fraction of a second, big enough to hold every split.
SMALL = dict(width=64, height=48, n_views=16, eval_every=4, n_seed_points=800, seed=3)


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory) -> Path:
    return S.make_default_scene(tmp_path_factory.mktemp("small") / "scene", **SMALL)


@pytest.fixture(scope="module")
def full_scene(tmp_path_factory) -> Path:
    """The built-in scene generated here. Not named `default_scene`: conftest's autouse session fixture may train the
    shared runs (which take conftest's `default_scene`) while this module's first test is set up, and a module
    fixture of that name would shadow it there."""
    start = time.perf_counter()
    root = S.ensure_default_scene(tmp_path_factory.mktemp("default") / "nsp-default-scene")
    # The README's first command generates this; it has to stay quick on a 2-core CPU box.
    assert time.perf_counter() - start < 30.0
    return root


def _meta(root: Path) -> dict:
    return json.loads((root / "transforms.json").read_text())


def _images(root: Path) -> list:
    return [np.asarray(Image.open(root / f["file_path"])) for f in _meta(root)["frames"]]


def test_defaults_agree_everywhere():
    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig

    signature = inspect.signature(S.make_default_scene)
    defaults = {k: p.default for k, p in signature.parameters.items() if k != "out_dir"}
    assert defaults == S.DEFAULT_SCENE_OPTIONS
    config = DefaultSceneDataParserConfig()
    assert {k: getattr(config, k) for k in defaults} == S.DEFAULT_SCENE_OPTIONS
    assert config.load_3D_points is True
    assert config.data == Path("data/nsp-default-scene")


def test_generation_is_byte_identical(tmp_path, small_scene):
    again = S.make_default_scene(tmp_path / "again", **SMALL)
    names = ["transforms.json", "points.npz", "sparse_pc.ply", "images/frame_00000.png", "images/frame_00015.png"]
    for name in names:
        assert (small_scene / name).read_bytes() == (again / name).read_bytes(), name
    assert sorted(p.name for p in (again / "images").iterdir()) == sorted(p.name for p in (small_scene / "images").iterdir())


def test_seed_changes_points_only(tmp_path, small_scene):
    other = S.make_default_scene(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert (other / "images/frame_00001.png").read_bytes() == (small_scene / "images/frame_00001.png").read_bytes()
    assert (other / "points.npz").read_bytes() != (small_scene / "points.npz").read_bytes()


def test_layout_and_splits(small_scene):
    meta = _meta(small_scene)
    assert meta["camera_model"] in ("PINHOLE", "OPENCV")
    assert (meta["w"], meta["h"]) == (SMALL["width"], SMALL["height"])
    assert meta["ply_file_path"] == "sparse_pc.ply"
    names = [f["file_path"] for f in meta["frames"]]
    assert names == [f"images/frame_{i:05d}.png" for i in range(SMALL["n_views"])]
    assert all((small_scene / n).is_file() for n in names)
    train, val, test = meta["train_filenames"], meta["val_filenames"], meta["test_filenames"]
    assert val == test
    assert len(val) == 4 and len(train) == 12
    assert not set(train) & set(val)
    assert sorted(train + val) == names
    # Same rule as nerfstudio's --eval-mode interval.
    assert val == [names[i] for i in range(len(names)) if i % SMALL["eval_every"] == 0]


def test_default_scene_size(full_scene):
    meta = _meta(full_scene)
    assert len(meta["frames"]) == 48
    assert (len(meta["train_filenames"]), len(meta["val_filenames"])) == (42, 6)
    image = np.asarray(Image.open(full_scene / meta["frames"][0]["file_path"]))
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    with np.load(full_scene / "points.npz") as npz:
        assert npz["xyz"].shape == (4000, 3)


def test_images_have_texture(full_scene):
    for i, image in enumerate(_images(full_scene)):
        pixels = image.reshape(-1, 3).astype(np.float64)
        assert pixels.std(axis=0).mean() > 25.0, i
        assert len(np.unique(pixels, axis=0)) > 500, i
        # Neighbouring pixels differ a lot in places: edges and texture, not just smooth gradients.
        grad = np.abs(np.diff(image.astype(np.int16), axis=1)).max(axis=2)
        assert (grad > 40).mean() > 0.02, i


def test_cameras_look_at_scene_centre(small_scene):
    for frame in _meta(small_scene)["frames"]:
        c2w = np.array(frame["transform_matrix"])
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
        rot, pos = c2w[:3, :3], c2w[:3, 3]
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-7)
        assert np.linalg.det(rot) > 0.999
        to_centre = S.LOOK_AT - pos
        assert 2.0 < np.linalg.norm(to_centre) < 4.0
        forward = -rot[:, 2]  # OpenGL: the camera looks down its -z axis
        np.testing.assert_allclose(forward, to_centre / np.linalg.norm(to_centre), atol=1e-7)
        assert rot[2, 1] > 0.5  # image up is roughly world up (+z)


def test_objects_occlude_each_other(small_scene):
    meta = _meta(small_scene)
    jj, ii = np.meshgrid(np.arange(meta["w"]) + 0.5, np.arange(meta["h"]) + 0.5)
    views_with_occlusion = 0
    for frame in meta["frames"]:
        o, d = S.pixel_rays(np.array(frame["transform_matrix"]), meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], jj.ravel(), ii.ravel())
        hits = np.isfinite(np.stack(S._object_hits(o, d)))
        if (hits.sum(axis=0) >= 2).sum() > 20:
            views_with_occlusion += 1
    assert views_with_occlusion >= len(meta["frames"]) // 4


def test_seed_points(small_scene):
    from plyfile import PlyData

    with np.load(small_scene / "points.npz") as npz:
        xyz, rgb = npz["xyz"], npz["rgb"]
    assert xyz.dtype == np.float32 and xyz.shape == (SMALL["n_seed_points"], 3)
    assert rgb.dtype == np.uint8 and rgb.shape == xyz.shape
    assert np.all(S.surface_distance(xyz) < 0.03)
    assert np.all((xyz >= S.SCENE_AABB[0]) & (xyz <= S.SCENE_AABB[1]))
    # Some points must be on the objects, not only on the floor and the wall.
    on_objects = (xyz[:, 2] > 0.03) & (np.hypot(xyz[:, 0], xyz[:, 1]) < 1.0)
    assert on_objects.mean() > 0.05
    assert rgb.astype(np.float64).std(axis=0).mean() > 20.0

    ply = PlyData.read(str(small_scene / "sparse_pc.ply"))
    assert ply.header.count("binary_little_endian") == 1
    v = ply["vertex"]
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), xyz)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), rgb)


def test_ensure_only_generates_when_missing(tmp_path):
    root = S.ensure_default_scene(tmp_path / "s", **SMALL)
    marker = root / "transforms.json"
    stamp = marker.stat().st_mtime_ns
    S.ensure_default_scene(root, **SMALL)
    assert marker.stat().st_mtime_ns == stamp

    # A folder without the marker counts as unfinished and is regenerated in place.
    marker.unlink()
    (root / "images" / "frame_00000.png").unlink()
    S.ensure_default_scene(root, **SMALL)
    assert marker.exists() and (root / "images" / "frame_00000.png").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_refuses_to_overwrite_foreign_data(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        S.ensure_default_scene(foreign, **SMALL)
    (foreign / "transforms.json").write_text(json.dumps({"frames": []}))
    with pytest.raises(FileExistsError):
        S.make_default_scene(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_dataparser_outputs(small_scene):
    import torch

    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig

    parser = DefaultSceneDataParserConfig(data=small_scene, **SMALL).setup()
    outputs = {split: parser.get_dataparser_outputs(split) for split in ("train", "val", "test")}
    assert len(outputs["train"].image_filenames) == outputs["train"].cameras.shape[0] == 12
    assert len(outputs["val"].image_filenames) == outputs["val"].cameras.shape[0] == 4
    assert outputs["val"].image_filenames == outputs["test"].image_filenames
    assert all(Path(p).is_file() for p in outputs["train"].image_filenames)

    train = outputs["train"]
    assert int(train.cameras.width[0]) == SMALL["width"] and int(train.cameras.height[0]) == SMALL["height"]
    xyz, rgb = train.metadata["points3D_xyz"], train.metadata["points3D_rgb"]
    assert xyz.dtype == torch.float32 and xyz.shape == (SMALL["n_seed_points"], 3)
    assert rgb.dtype == torch.uint8 and rgb.shape == xyz.shape
    origins = train.cameras.camera_to_worlds[:, :3, 3]
    # Normalised like nerfstudio-data: the largest camera coordinate is 1.
    assert abs(float(origins.abs().max()) - 1.0) < 1e-5
    lo, hi = train.scene_box.aabb
    for pts in (origins, xyz):
        assert bool(torch.all((pts >= lo) & (pts <= hi)))


def test_dataparser_generates_on_first_use_and_skips_points(tmp_path):
    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig

    target = tmp_path / "fresh"
    outputs = DefaultSceneDataParserConfig(data=target, load_3D_points=False, **SMALL).setup().get_dataparser_outputs("train")
    assert (target / "transforms.json").exists()
    assert "points3D_xyz" not in outputs.metadata


def test_rays_match_nerfstudio_cameras(small_scene):
    import torch

    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig

    meta = _meta(small_scene)
    cameras = DefaultSceneDataParserConfig(data=small_scene, auto_scale_poses=False).setup().get_dataparser_outputs("train").cameras
    first_train = meta["frames"][1]  # view 0 is eval
    c2w = np.array(first_train["transform_matrix"])
    rows, cols = np.array([0, 10, 47, 23]), np.array([0, 63, 5, 31])
    coords = torch.tensor(np.stack([rows, cols], 1), dtype=torch.float32) + 0.5  # (y, x) pixel centres
    rays = cameras.generate_rays(camera_indices=0, coords=coords)
    o, d = S.pixel_rays(c2w, meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], cols + 0.5, rows + 0.5)
    np.testing.assert_allclose(rays.directions.numpy(), d, atol=1e-5)
    np.testing.assert_allclose(rays.origins.numpy(), o, atol=1e-5)


def test_nerfstudio_parser_round_trip(small_scene):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    try:
        import open3d  # noqa: F401

        have_open3d = True
    except Exception:  # open3d needs system libraries (libusb, GL) that may be missing
        have_open3d = False
    parser = NerfstudioDataParserConfig(data=small_scene, load_3D_points=have_open3d).setup()
    train = parser.get_dataparser_outputs("train")
    val = parser.get_dataparser_outputs("val")
    assert len(train.image_filenames) == 12 and len(val.image_filenames) == 4
    if have_open3d:
        assert train.metadata["points3D_xyz"].shape == (SMALL["n_seed_points"], 3)
        assert train.metadata["points3D_rgb"].dtype.is_floating_point is False


def test_entry_point_and_light_import(tmp_path):
    from nerfstudio.plugins.registry_dataparser import discover_dataparsers

    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig

    parsers, descriptions = discover_dataparsers()
    assert isinstance(parsers["nsp-default-scene"], DefaultSceneDataParserConfig)
    assert descriptions["nsp-default-scene"]

    # Importing must neither write the scene (relative default path) nor pull in open3d.
    code = "import sys, nerfstudio_pruning.data.dataparser; assert 'open3d' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert list(tmp_path.iterdir()) == []
