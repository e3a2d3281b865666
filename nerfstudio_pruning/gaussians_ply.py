"""3DGS PLY files in Inria's layout, read into `Gaussians` and written back; moving Gaussians between world frames.

The layout (Inria's 3DGS, gsplat's simple_trainer, Postshot, and nerfstudio's `ns-export gaussian-splat`): one
`vertex` element with float properties x, y, z, optionally nx, ny, nz (unused, zeros), f_dc_0..2 (the DC SH
coefficient of r, g, b), f_rest_0..f_rest_{3((d+1)^2-1)-1} for SH degree d (channel-major: every red coefficient of
degrees 1..d, then green's, then blue's), opacity (a logit), scale_0..2 (logs) and rot_0..3 (a quaternion w, x, y,
z, not necessarily normalised). At SH degree 0 there is no f_rest (nerfstudio 1.1.5 writes none; its earlier
misaligned degree-0 files, upstream issue #3377, fail the checks below). Other properties are ignored.

Every check runs before a value is used, and each failure is one `InputError` line: a missing property, NaN or
infinite values, a zero quaternion, an empty file, an f_rest count that fits no SH degree, another SH degree than
the one asked for.

Plain numpy, torch and plyfile: no nerfstudio. The frame change (`in_frame`) is what a PLY trained on COLMAP's
poses (Inria's trainer) needs to sit in nerfstudio's dataparser frame: positions map as the dataparser maps
COLMAP's points, and orientations and view-dependent colours rotate with them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from torch import Tensor

from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.types import Gaussians

MAX_SH_DEGREE = 3


def sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def property_names(sh_degree: int, normals: bool = True):
    """The vertex properties of a PLY at `sh_degree`, in the order Inria's trainer and ns-export write them."""
    rest = 3 * (sh_bases(sh_degree) - 1)
    return (["x", "y", "z"] + (["nx", "ny", "nz"] if normals else []) + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(rest)] + ["opacity"] + [f"scale_{i}" for i in range(3)]
            + [f"rot_{i}" for i in range(4)])


def _degree_of_rest_count(count: int) -> Optional[int]:
    for degree in range(MAX_SH_DEGREE + 1):
        if count == 3 * (sh_bases(degree) - 1):
            return degree
    return None


def read_gaussians_ply(path: Union[str, Path], sh_degree: Optional[int] = None) -> Gaussians:
    """The Gaussians of a 3DGS PLY (float32, CPU), rendered at the file's SH degree.

    `sh_degree`: the degree the caller is configured for; a file of another degree is refused (None: any degree).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PLY {path} does not exist")
    try:
        ply = PlyData.read(str(path))
    except Exception as err:  # plyfile raises several types for a malformed header or body
        raise InputError(f"{path} is not a readable PLY file ({type(err).__name__}: {err})") from None
    names = [element.name for element in ply.elements]
    if "vertex" not in names:
        raise InputError(f"{path} has no 'vertex' element (it has {names or 'none'}): not a 3DGS PLY")
    vertex = ply["vertex"]
    present = {p.name for p in vertex.properties}

    rest_indices = sorted(int(name[len("f_rest_"):]) for name in present
                          if name.startswith("f_rest_") and name[len("f_rest_"):].isdigit())
    degree = _degree_of_rest_count(len(rest_indices))
    if degree is None:
        raise InputError(f"{path} has {len(rest_indices)} f_rest_* properties, which fits no SH degree 0-3 "
                         "(0, 9, 24 or 45): not a 3DGS PLY, or a broken one")
    required = property_names(degree, normals=False)
    missing = [name for name in required if name not in present]
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise InputError(f"{path} lacks {len(missing)} propert{'y' if len(missing) == 1 else 'ies'} of the 3DGS layout: "
                         f"{shown}")
    if sh_degree is not None and degree != sh_degree:
        raise InputError(f"{path} holds SH degree {degree} ({len(rest_indices)} f_rest_* properties), this config has "
                         f"sh_degree {sh_degree}: pass --pipeline.model.sh-degree {degree}")
    n = int(vertex.count)
    if n == 0:
        raise InputError(f"{path} holds no Gaussians (0 vertices); there is nothing to train or prune")

    def columns(*props: str) -> np.ndarray:
        return np.stack([np.asarray(vertex[p], dtype=np.float32) for p in props], axis=-1)

    values = {name: columns(name)[:, 0] for name in required}
    broken = {name: int((~np.isfinite(v)).sum()) for name, v in values.items()}
    broken = {name: count for name, count in broken.items() if count}
    if broken:
        rows = int((~np.all(np.stack([np.isfinite(values[name]) for name in broken]), axis=0)).sum())
        shown = ", ".join(f"{name} ({count})" for name, count in list(broken.items())[:4])
        raise InputError(f"{path} has NaN or infinite values in {rows} of its {n} Gaussians: {shown}"
                         + (", ..." if len(broken) > 4 else ""))
    quats = columns("rot_0", "rot_1", "rot_2", "rot_3")
    zero = int((np.linalg.norm(quats, axis=-1) == 0).sum())
    if zero:
        raise InputError(f"{path} has {zero} Gaussians with a zero rotation quaternion (rot_0..3 all 0)")

    dc = columns("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :]
    k = sh_bases(degree) - 1
    # Channel-major: f_rest_{c * k + j} is coefficient j + 1 of channel c.
    rest = columns(*[f"f_rest_{i}" for i in range(3 * k)]).reshape(n, 3, k).transpose(0, 2, 1) if k else dc[:, :0]
    return Gaussians(
        means=torch.from_numpy(columns("x", "y", "z")),
        quats=torch.from_numpy(quats),
        log_scales=torch.from_numpy(columns("scale_0", "scale_1", "scale_2")),
        opacity_logits=torch.from_numpy(values["opacity"].copy()),
        sh=torch.from_numpy(np.ascontiguousarray(np.concatenate([dc, rest], axis=1))),
        sh_degree=degree,
    )


def write_gaussians_ply(path: Union[str, Path], gaussians: Gaussians) -> Path:
    """Write `gaussians` at their `sh_degree` in the layout above (float32, binary little-endian, normals 0)."""
    path = Path(path)
    g = gaussians.detach()
    n, degree = len(g), g.sh_degree
    k = sh_bases(degree)
    if g.sh.shape[1] < k:
        raise ValueError(f"sh has {g.sh.shape[1]} coefficients, degree {degree} needs {k}")
    sh = g.sh[:, :k].float().cpu().numpy()
    columns = [g.means.float().cpu().numpy(), np.zeros((n, 3), np.float32), sh[:, 0, :],
               sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1), g.opacity_logits.float().cpu().numpy()[:, None],
               g.log_scales.float().cpu().numpy(), g.quats.float().cpu().numpy()]
    table = np.concatenate(columns, axis=1).astype(np.float32)
    names = property_names(degree)
    records = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        records[name] = table[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(records, "vertex")], byte_order="<").write(str(path))
    return path


# -- frames --------------------------------------------------------------------------------------------------------
def _quaternion_of_rotation(rotation: Tensor) -> Tensor:
    """wxyz unit quaternion of a proper 3x3 rotation matrix (float64)."""
    r = rotation
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    candidates = torch.stack([trace, r[0, 0], r[1, 1], r[2, 2]])
    i = int(torch.argmax(candidates))
    if i == 0:
        s = 2.0 * torch.sqrt(1.0 + trace)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif i == 1:
        s = 2.0 * torch.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif i == 2:
        s = 2.0 * torch.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = 2.0 * torch.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    return torch.stack(q)


def _quaternion_product(a: Tensor, b: Tensor) -> Tensor:
    """a * b for wxyz quaternions (broadcast over leading dimensions)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def sh_basis(degree: int, directions: Tensor) -> Tensor:
    """[M, (degree+1)^2] the real SH basis the renderers use (gsplat's, Inria's) at unit `directions` [M, 3]."""
    from nerfstudio_pruning.render.cpu.projection import _sh_basis

    dirs = directions.double().cpu().numpy()
    out = np.zeros((dirs.shape[0], sh_bases(degree)), dtype=np.float64)
    for i, (x, y, z) in enumerate(dirs):
        _sh_basis(degree, float(x), float(y), float(z), out[i])
    return torch.from_numpy(out)


def sh_rotation(rotation: Tensor, degree: int) -> Tensor:
    """[K, K] (K = (degree+1)^2, float64) matrix D with sh' = D sh per colour channel: the coefficients whose colour
    in direction `rotation @ d` is the old colour in direction d, for an orthogonal 3x3 `rotation`.

    Each degree's band is closed under rotation, so D is block diagonal; each block is solved by least squares
    from the basis at random directions (exact up to rounding: the system is consistent)."""
    k = sh_bases(degree)
    generator = torch.Generator().manual_seed(0)
    new_dirs = torch.nn.functional.normalize(torch.randn(4 * k + 16, 3, generator=generator, dtype=torch.float64), dim=-1)
    old_dirs = new_dirs @ rotation.double()  # rows: rotation^T @ d'
    basis_new, basis_old = sh_basis(degree, new_dirs), sh_basis(degree, old_dirs)
    d = torch.zeros(k, k, dtype=torch.float64)
    for band in range(degree + 1):
        lo, hi = band * band, (band + 1) ** 2
        # Rows: Y(R^T d') = Y(d') X, so colour c^T Y(R^T d') = (X c)^T Y(d'): D = X.
        d[lo:hi, lo:hi] = torch.linalg.lstsq(basis_new[:, lo:hi], basis_old[:, lo:hi]).solution
    return d


def in_frame(gaussians: Gaussians, transform: Tensor, scale: float) -> Gaussians:
    """The Gaussians moved by x -> scale * (R x + t), `transform` = [R | t] ([3, 4] or [4, 4]) with R orthogonal:
    positions, orientations, sizes and view-dependent colours, so that cameras moved the same way see the same
    images. This is how nerfstudio's dataparsers map COLMAP's world (and its points) into their frame
    (`dataparser_transform`, which includes transforms.json's `applied_transform`, and `dataparser_scale`)."""
    transform = transform.detach().double().cpu()[:3, :4]
    rotation, translation = transform[:, :3], transform[:, 3]
    if not torch.allclose(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-4):
        raise ValueError("the transform's 3x3 part is not a rotation (or reflection)")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    g = gaussians.detach()
    dtype = g.means.dtype
    means = scale * (g.means.double() @ rotation.T + translation)
    # A reflection is the proper rotation -R followed by x -> -x, which leaves every covariance (R S^2 R^T) unchanged.
    proper = rotation if torch.det(rotation) > 0 else -rotation
    quats = _quaternion_product(_quaternion_of_rotation(proper), g.quats.double())
    degree = min(g.sh_degree, int(math.isqrt(g.sh.shape[1])) - 1)
    k = sh_bases(degree)
    rotated = torch.einsum("ij,njc->nic", sh_rotation(rotation, degree), g.sh[:, :k].double())
    sh = torch.cat([rotated, g.sh[:, k:].double()], dim=1)
    return g.with_tensors(means=means.to(dtype), quats=quats.to(dtype), log_scales=g.log_scales + math.log(scale),
                          sh=sh.to(g.sh.dtype))


def inverse_frame(transform: Tensor, scale: float):
    """(transform, scale) of the inverse of x -> scale * (R x + t): x -> (1 / scale) * (R^T x - R^T t * scale)."""
    transform = transform.detach().double().cpu()[:3, :4]
    rotation, translation = transform[:, :3], transform[:, 3]
    inverse = torch.cat([rotation.T, (-rotation.T @ translation * scale)[:, None]], dim=1)
    return inverse, 1.0 / scale
