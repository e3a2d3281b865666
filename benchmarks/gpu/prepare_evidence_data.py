"""Make the datasets the kit's `evidence` stage trains on, here, where ../shared/data is: the device tool carries
only the checkout (../shared stays behind), so each capture is written, downscaled, into
benchmarks/gpu/evidence_data/<name>/ (ignored by git; carry that folder).

    python benchmarks/gpu/prepare_evidence_data.py                     # bonsai at 1/2, buddha_gray67 at 1/4
    python benchmarks/gpu/prepare_evidence_data.py --tiny /tmp/kit/evidence_data   # the CPU dry run's copies

Each copy is what `nerfstudio-data --downscale-factor F` (our `nerfstudio-data-cached`) reads from the capture,
made ahead: images resized to floor(size / F) with PIL's bicubic filter and saved as JPEG quality 95 (as
`data/cached_dataparser.downscaled_mirror` makes them), intrinsics fl_x, fl_y, cx, cy multiplied by 1/F and w, h
floored (as nerfstudio's `Cameras.rescale_output_resolution`), distortion and poses unchanged, and the seed points
written as a binary PLY of float32 x, y, z and uchar colours (the values nerfstudio keeps of the text PLY). So the
copy trains at downscale 1 exactly as the capture trains at F: where nerfstudio is importable the script checks it
(cameras, poses, scale, seed points and pixels equal through nerfstudio's own parser). A SOURCE.md says what each
copy is. The copies do not depend on ../shared at run time.

--tiny: a few views at 1/16 and 2,000 seed points of each capture, for `KIT_DEVICE=cpu` dry runs of the stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

KIT_DIR = Path(__file__).resolve().parent
REPO_ROOT = KIT_DIR.parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
if not SHARED_DATA.is_dir():  # a worktree of the main checkout: ../shared is beside the main checkout
    SHARED_DATA = Path("/work/shared/data")

# name: (capture, downscale factor for the GPU run). bonsai at 1/2 is 400x266 (issue 30); buddha_gray67 at 1/4 is
# 171x96, the resolution docs/results.md measured it at on CPU, so the two devices' tables can be read side by side.
SCENES = {"bonsai": ("bonsai", 2), "buddha_gray67": ("buddha_gray67", 4)}
TINY = {"factor": 16, "views": 16, "points": 2000}
INTRINSICS = ("fl_x", "fl_y", "cx", "cy")


def scaled_camera(entry: dict, factor: int) -> dict:
    out = dict(entry)
    for key in INTRINSICS:
        if key in out:
            out[key] = float(out[key]) / factor
    for key in ("w", "h"):
        if key in out:
            out[key] = int(out[key]) // factor
    return out


def read_points(path: Path):
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    xyz = np.stack([np.asarray(vertex[c], dtype=np.float32) for c in "xyz"], axis=-1)
    rgb = np.stack([np.asarray(vertex[c], dtype=np.uint8) for c in ("red", "green", "blue")], axis=-1)
    return xyz, rgb


def write_points(path: Path, xyz: np.ndarray, rgb: np.ndarray, text: bool = False) -> None:
    from plyfile import PlyData, PlyElement

    data = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                     ("blue", "u1")])
    for i, c in enumerate("xyz"):
        data[c] = xyz[:, i]
    for i, c in enumerate(("red", "green", "blue")):
        data[c] = rgb[:, i]
    PlyData([PlyElement.describe(data, "vertex")], text=text).write(str(path))


def make_copy(source: Path, dest: Path, factor: int, views: int = 0, points: int = 0) -> dict:
    """Write the downscaled copy; returns what SOURCE.md and the check need."""
    from PIL import Image
    from tqdm import tqdm

    meta = json.loads((source / "transforms.json").read_text())
    frames = meta["frames"]
    if views:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, views).round().astype(int)]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    out_frames = []
    for frame in tqdm(frames, desc=f"{source.name} at 1/{factor} -> {dest}", unit="img"):
        src = source / frame["file_path"]
        with Image.open(src) as im:
            size = (im.width // factor, im.height // factor)
            im.resize(size, Image.BICUBIC).save(tmp / "images" / src.name, quality=95)
        out_frames.append(scaled_camera({**frame, "file_path": f"images/{src.name}"}, factor))
    out = scaled_camera({k: v for k, v in meta.items() if k != "frames"}, factor)
    out["frames"] = out_frames
    xyz, rgb = read_points(source / meta["ply_file_path"])
    if points and len(xyz) > points:
        keep = np.random.default_rng(0).choice(len(xyz), points, replace=False)
        xyz, rgb = xyz[np.sort(keep)], rgb[np.sort(keep)]
    out["ply_file_path"] = "sparse_pc.ply"
    write_points(tmp / "sparse_pc.ply", xyz, rgb)
    (tmp / "transforms.json").write_text(json.dumps(out, indent=1))
    info = {"source": str(source), "factor": factor, "views": len(out_frames), "points": len(xyz),
            "size": list(size)}
    (tmp / "SOURCE.md").write_text(
        f"# {dest.name}: {source.name} at 1/{factor} ({size[0]}x{size[1]}), made by "
        f"benchmarks/gpu/prepare_evidence_data.py\n\n"
        f"- From {source} (see its SOURCE.md for origin and licence; not to be redistributed beyond that).\n"
        f"- {len(out_frames)} views{' (evenly spaced subset)' if views else ''}, images resized to floor(size / "
        f"{factor}) with PIL bicubic, JPEG quality 95; intrinsics x 1/{factor}; poses and distortion unchanged.\n"
        f"- {len(xyz):,} seed points{' (random subset, seed 0)' if points else ''}, binary PLY (float32 xyz, uchar "
        "rgb).\n- Trains at downscale 1 as the capture trains with `--downscale-factor "
        f"{factor}`{' (checked through nerfstudio-data when prepared)' if not views else ''}.\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return info


def check_equivalent(source: Path, copy: Path, factor: int) -> str:
    """nerfstudio-data on the copy at downscale 1 against nerfstudio-data-cached on the capture at `factor`."""
    try:
        import torch

        from nerfstudio_pruning.data.cached_dataparser import CachedNerfstudioDataParserConfig
    except ImportError as err:
        return f"not checked (nerfstudio not importable here: {err})"
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as cache:
        ref = CachedNerfstudioDataParserConfig(data=source, downscale_factor=factor, cache_dir=Path(cache)).setup()
        new = CachedNerfstudioDataParserConfig(data=copy, downscale_factor=1).setup()
        for split in ("train", "test"):
            a, b = ref.get_dataparser_outputs(split), new.get_dataparser_outputs(split)
            for attr in ("fx", "fy", "cx", "cy", "width", "height", "distortion_params", "camera_to_worlds"):
                x, y = getattr(a.cameras, attr), getattr(b.cameras, attr)
                if not torch.allclose(x.double(), y.double(), rtol=0, atol=1e-5):
                    raise SystemExit(f"{copy}: {split} cameras' {attr} differ from {source} at 1/{factor}")
            if a.dataparser_scale != b.dataparser_scale or not torch.equal(a.dataparser_transform, b.dataparser_transform):
                raise SystemExit(f"{copy}: the dataparser transform differs from {source} at 1/{factor}")
            for key in ("points3D_xyz", "points3D_rgb"):
                if not torch.equal(a.metadata[key], b.metadata[key]):
                    raise SystemExit(f"{copy}: {key} differs from {source} at 1/{factor}")
            for fa, fb in zip(a.image_filenames, b.image_filenames):
                if not np.array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb))):
                    raise SystemExit(f"{copy}: pixels of {fb.name} differ from {fa}")
    return "checked: nerfstudio-data reads the same cameras, poses, scale, seed points and pixels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=KIT_DIR / "evidence_data")
    parser.add_argument("--tiny", type=Path, default=None, help="write the dry run's tiny copies into this folder")
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    args = parser.parse_args()
    out = args.tiny or args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in args.scenes:
        capture, factor = SCENES[name]
        source = SHARED_DATA / capture
        if not (source / "transforms.json").is_file():
            sys.exit(f"error: no capture at {source} (prepare where ../shared/data is)")
        if args.tiny:
            info = make_copy(source, out / name, TINY["factor"], TINY["views"], TINY["points"])
            print(f"{name}: {info}")
            continue
        info = make_copy(source, out / name, factor)
        size = sum(f.stat().st_size for f in (out / name).rglob("*") if f.is_file())
        print(f"{name}: {info}, {size / 2**20:.2f} MiB; {check_equivalent(source, out / name, factor)}")


if __name__ == "__main__":
    main()
