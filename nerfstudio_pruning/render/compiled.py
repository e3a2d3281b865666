"""The compiled CPU rasterizer: gsplat 1.4.0's `rasterization()` with numba kernels for projection and compositing.

`compiled_rasterization` has the signature, outputs and `meta` keys of `reference.torch_rasterization` (and so
of `gsplat.rendering.rasterization`). Projection and spherical harmonics run in the numba kernels of
`cpu/projection.py` (`compiled_project`, the same results as `projection.project`, which it falls back to
for what the kernels do not cover: explicit covariances, camera gradients, per-camera SH); the tile binning, the
front-to-back compositing and its backward pass run in those of `cpu/binning.py` and `cpu/compositing.py`; both are
wrapped here as `torch.autograd.Function`s. `compiled_find_pairs` returns the same `Pairs` as `pairs.find_pairs`,
enumerated from the same tile lists, for the scores; PUP's gradient moments walk the same tile lists
(`scoring/cpu_moments.py`).

Threads and the launch lock: `cpu/launch.py`.

Bad input raises ValueError with one sentence: zero-size images, a tile size < 1, projected rows that reach the
image with non-finite means2d/conics/opacities/depths, more than 2^31 - 1 tile-list entries, or (for
`compiled_find_pairs`, which materialises them) more than 2^31 - 1 pairs. Memory is O(rows + tile-list entries
+ pixels) for rendering and O(pairs) more for `compiled_find_pairs`; never pixels x Gaussians.

Precision: float32 per pair as gsplat, transmittance in float64 (see cpu/compositing.py); outputs are float32
and are cast to the dtype of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_pruning.render.constants import EPS2D, FAR_PLANE, NEAR_PLANE, TILE_SIZE
from nerfstudio_pruning.render.cpu import binning, compositing, projection as cpu_projection
from nerfstudio_pruning.render.cpu.launch import KERNEL_LOCK, TILE_CHUNK, as_float32, as_numpy, launch
from nerfstudio_pruning.render.frontend import rasterize_with
from nerfstudio_pruning.render.pairs import Pairs
from nerfstudio_pruning.render.projection import ProjectedGaussians, flattened, project

# Tile-list entries are addressed with int32 in gsplat (flatten_ids, tile offsets); we keep its limit so that a
# scene that would not render on the GPU fails the same way here, before allocating tens of GB.
MAX_TILE_ENTRIES = 2**31 - 1
# `compiled_find_pairs` materialises 16 bytes per pair; 2^31 pairs would be 32 GB.
MAX_PAIRS = 2**31 - 1


@dataclass
class TileBins:
    """Per (camera, tile) lists of projected rows, front to back, and the per-row tables the kernels read."""

    gauss: np.ndarray  # [M, 8] float32: mean x, y, conic (3), opacity, 2 unused
    rects: np.ndarray  # [M, 4] int64: candidate pixel rectangle x0, x1, y0, y1 (half-open)
    tile_offsets: np.ndarray  # [C * tiles + 1] int64
    tile_rows: np.ndarray  # [entries] int32
    row_offsets: np.ndarray  # [M + 1] int64: row r's gradient slots (one per tile it touches) start here
    n_cameras: int
    width: int
    height: int
    tile_size: int
    tile_w: int
    tile_h: int

    @property
    def n_entries(self) -> int:
        return int(self.tile_rows.shape[0])

    def kernel_args(self) -> tuple:
        """The leading arguments shared by `rasterize_tiles` and `backward_tiles`."""
        return (self.rects, self.tile_offsets, self.tile_rows, self.width, self.height, self.tile_size,
                self.tile_w, self.tile_h)


def check_image_size(width: int, height: int, tile_size: int) -> None:
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"cannot rasterize a zero-size image ({width}x{height} pixels).")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}.")


def _refuse_rows(proj: ProjectedGaussians, not_finite: np.ndarray, camera_ids: np.ndarray, n_cameras: int) -> None:
    """Refuse rows that reach the image (radius > 0) with values the kernels cannot composite."""
    bad = np.flatnonzero(not_finite)
    if bad.size:
        n_visible = int((proj.radii > 0).sum())
        raise ValueError(
            f"{bad.size} of the {n_visible} projected Gaussians that reach the image have non-finite means2d, "
            f"conics, opacities or depths (first: row {bad[0]}, Gaussian {int(proj.gaussian_ids[bad[0]])}), so the "
            "image would be undefined."
        )
    if camera_ids.size and (camera_ids.min() < 0 or camera_ids.max() >= n_cameras):
        raise ValueError(f"camera ids of projected Gaussians must lie in [0, {n_cameras}), got {camera_ids.max()}.")


def bin_tiles(proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int) -> TileBins:
    """Tile intersection and depth sort (isect_tiles.cu + its radix sort) for the projected rows."""
    check_image_size(width, height, tile_size)
    width, height, tile_size = int(width), int(height), int(tile_size)
    tile_w = math.ceil(width / tile_size)
    tile_h = math.ceil(height / tile_size)
    n_rows = proj.means2d.shape[0]
    gauss = np.empty((n_rows, binning.GAUSS_COLUMNS), np.float32)
    rects = np.empty((n_rows, 4), np.int64)
    n_tiles = np.empty(n_rows, np.int64)
    not_finite = np.empty(n_rows, np.uint8)
    radii = proj.radii.detach().to(device="cpu", dtype=torch.int32).contiguous().numpy()
    depths = as_float32(proj.depths)
    launch(binning.prepare_rows, as_float32(proj.means2d), as_float32(proj.conics), as_float32(proj.opacities), depths,
           radii, width, height, tile_size, tile_w, tile_h, gauss, rects, n_tiles, not_finite)
    camera_ids = proj.camera_ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    _refuse_rows(proj, not_finite, camera_ids[n_tiles > 0], n_cameras)
    n_entries = int(n_tiles.sum())
    if n_entries > MAX_TILE_ENTRIES:
        raise ValueError(
            f"the view needs {n_entries:,} (Gaussian, tile) entries, more than the 2^31 - 1 the rasterizer "
            "addresses; render fewer cameras at once or a smaller image."
        )
    tile_offsets = np.empty(n_cameras * tile_w * tile_h + 1, np.int64)
    tile_rows = np.empty(n_entries, np.int32)
    row_offsets = np.empty(n_rows + 1, np.int64)
    with KERNEL_LOCK:
        binning.bin_rows(rects, n_tiles, camera_ids, tile_size, tile_w, tile_h, n_cameras, tile_offsets, tile_rows,
                         row_offsets)
    launch(binning.sort_tiles, binning.depth_sort_keys(depths), tile_offsets, tile_rows, chunk=TILE_CHUNK)
    return TileBins(gauss, rects, tile_offsets, tile_rows, row_offsets, n_cameras, width, height, tile_size,
                    tile_w, tile_h)


@dataclass
class ForwardResult:
    color: np.ndarray  # [C, H, W, D] float32, background included
    transmittance: np.ndarray  # [C, H, W] float64
    last_ids: np.ndarray  # [C, H, W] int64, -1 where no pair
    count: np.ndarray  # [C, H, W] int32


def no_background(n_cameras: int, channels: int) -> np.ndarray:
    return np.zeros((n_cameras, channels), np.float32)


def run_forward(bins: TileBins, colors: np.ndarray, backgrounds: Optional[np.ndarray],
                pair_offsets: Optional[np.ndarray] = None, pair_pixel: Optional[np.ndarray] = None,
                pair_row: Optional[np.ndarray] = None) -> ForwardResult:
    c, h, w, d = bins.n_cameras, bins.height, bins.width, colors.shape[1]
    out = ForwardResult(
        color=np.empty((c, h, w, d), np.float32),
        transmittance=np.empty((c, h, w), np.float64),
        last_ids=np.empty((c, h, w), np.int64),
        count=np.empty((c, h, w), np.int32),
    )
    emit = pair_offsets is not None
    unused = np.zeros(1, np.int64)
    launch(
        compositing.rasterize_tiles, bins.gauss, colors, *bins.kernel_args(),
        backgrounds if backgrounds is not None else no_background(c, d), backgrounds is not None,
        emit, pair_offsets if emit else unused, pair_pixel if emit else unused, pair_row if emit else unused,
        out.color, out.transmittance, out.last_ids, out.count, compositing.LANES, chunk=TILE_CHUNK,
    )
    return out


class _CompositeTiles(torch.autograd.Function):
    """Compositing of binned rows as an autograd node: inputs are the rows' means2d, conics, colours, opacities.

    The kernels read the float32 copies made when binning (bins.gauss) and at forward time (colours); the
    backward pass returns float32 gradients cast to each input's dtype.
    """

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, bins, absgrad_target, info):
        colors_np = as_float32(colors)
        bg_np = as_float32(backgrounds) if backgrounds is not None else None
        fwd = run_forward(bins, colors_np, bg_np)
        info["n_pairs"] = int(fwd.count.sum(dtype=np.int64))
        ctx.bins = bins
        ctx.colors_np = colors_np
        ctx.bg_np = bg_np
        ctx.fwd = fwd
        ctx.absgrad_target = absgrad_target
        ctx.dtypes = (means2d.dtype, conics.dtype, colors.dtype, opacities.dtype,
                      backgrounds.dtype if backgrounds is not None else None)
        image = torch.from_numpy(fwd.color).to(colors.dtype)
        alphas = torch.from_numpy(1.0 - fwd.transmittance).to(colors.dtype).unsqueeze(-1)
        return image, alphas

    @staticmethod
    def backward(ctx, v_image, v_alphas):
        bins: TileBins = ctx.bins
        fwd: ForwardResult = ctx.fwd
        n_chan = ctx.colors_np.shape[1]
        n_cols = compositing.GRAD_COLORS + n_chan + 2
        v_image_np = as_float32(v_image)
        v_alpha_np = as_float32(v_alphas[..., 0])
        entry_grads = np.empty((bins.n_entries, n_cols), np.float32)
        bg = ctx.bg_np if ctx.bg_np is not None else no_background(bins.n_cameras, n_chan)
        launch(compositing.backward_tiles, bins.gauss, ctx.colors_np, *bins.kernel_args(), bg, ctx.bg_np is not None,
               fwd.transmittance, fwd.last_ids, v_image_np, v_alpha_np, bins.row_offsets, entry_grads,
               compositing.LANES, chunk=TILE_CHUNK)
        row_grads = np.empty((bins.gauss.shape[0], n_cols), np.float32)
        launch(compositing.reduce_rows, entry_grads, bins.row_offsets, row_grads)
        g = torch.from_numpy(row_grads)
        m_dtype, c_dtype, col_dtype, o_dtype, bg_dtype = ctx.dtypes
        v_means2d = g[:, compositing.GRAD_MX:compositing.GRAD_MY + 1].to(m_dtype)
        v_conics = g[:, compositing.GRAD_C0:compositing.GRAD_C2 + 1].to(c_dtype)
        v_opacities = g[:, compositing.GRAD_OPACITY].to(o_dtype)
        v_colors = g[:, compositing.GRAD_COLORS:compositing.GRAD_COLORS + n_chan].to(col_dtype)
        if ctx.absgrad_target is not None and ctx.needs_input_grad[0]:
            absgrad = g[:, compositing.GRAD_COLORS + n_chan:].to(m_dtype)
            ctx.absgrad_target.absgrad = absgrad.view_as(ctx.absgrad_target)
        v_backgrounds = None
        if ctx.needs_input_grad[4]:
            # d image / d background = T_final per pixel (gsplat computes this in torch too).
            t_final = torch.from_numpy(fwd.transmittance).to(v_image.dtype)
            v_backgrounds = (v_image * t_final[..., None]).sum(dim=(1, 2)).to(bg_dtype)
        return v_means2d, v_conics, v_colors, v_opacities, v_backgrounds, None, None, None


def compiled_composite(
    proj: ProjectedGaussians,
    n_cameras: int,
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
    backgrounds: Optional[Tensor] = None,
    absgrad_target: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, int]:
    """Colours [C, H, W, D], alphas [C, H, W, 1] and the number of pairs composited; as `reference.composite`."""
    bins = bin_tiles(proj, n_cameras, width, height, tile_size)
    info: Dict[str, int] = {}
    image, alphas = _CompositeTiles.apply(
        proj.means2d, proj.conics, proj.colors, proj.opacities, backgrounds, bins, absgrad_target, info
    )
    return image, alphas, info["n_pairs"]


@torch.no_grad()
def compiled_find_pairs(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int = TILE_SIZE
) -> Pairs:
    """`pairs.find_pairs` from the compiled tile lists: the same pairs, sorted by pixel and front to back.

    Two runs of the forward kernel: one counts the pairs per pixel, the second writes them at their offsets.
    """
    bins = bin_tiles(proj, n_cameras, width, height, tile_size)
    no_colors = np.empty((bins.gauss.shape[0], 0), np.float32)
    counted = run_forward(bins, no_colors, None)
    pair_offsets = np.zeros(counted.count.size + 1, np.int64)
    np.cumsum(counted.count.reshape(-1), out=pair_offsets[1:])
    n_pairs = int(pair_offsets[-1])
    if n_pairs > MAX_PAIRS:
        raise ValueError(
            f"the view composites {n_pairs:,} pairs, more than the 2^31 - 1 a pair list may hold; "
            "enumerate fewer cameras at once or a smaller image."
        )
    pixel = np.empty(n_pairs, np.int64)
    row = np.empty(n_pairs, np.int64)
    run_forward(bins, no_colors, None, pair_offsets, pixel, row)
    device = proj.means2d.device
    return Pairs(pixel=torch.from_numpy(pixel).to(device), row=torch.from_numpy(row).to(device))


def compiled_compositor(
    proj: ProjectedGaussians, n_cameras: int, width: int, height: int, tile_size: int,
    backgrounds: Optional[Tensor], absgrad_target: Optional[Tensor],
) -> Tuple[Tensor, Tensor, int]:
    """`compiled_composite` in the form `frontend.rasterize_with` takes."""
    check_image_size(width, height, tile_size)
    if backgrounds is not None:
        backgrounds = backgrounds.reshape(n_cameras, proj.colors.shape[-1])
    return compiled_composite(proj, n_cameras, width, height, tile_size, backgrounds, absgrad_target=absgrad_target)


class _ProjectGaussians(torch.autograd.Function):
    """`cpu_projection.project_forward`/`project_backward` as an autograd node.

    Inputs: means [N, 3], quats [N, 4], scales [N, 3], opacities [N], SH coefficients [N, K, 3] (K = 0: colours
    are not evaluated here), viewmats [C, 4, 4] and Ks [C, 3, 3] (no gradient), and the settings tuple.
    Outputs [C, N, ...]: means2d, conics, depths, opacities (compensation applied), colours, radii.
    """

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, sh, viewmats, Ks, settings):
        width, height, eps2d, near_plane, far_plane, radius_clip, sh_degree, antialiased = settings
        n, c = means.shape[0], viewmats.shape[0]
        # float32 as gsplat; float64 stays float64 (the exactness tests compare with autograd in float64).
        dtype = torch.float64 if means.dtype == torch.float64 else torch.float32
        ctx.dtype = dtype
        arrays = [as_numpy(t, dtype) for t in (means, quats, scales, opacities, sh, viewmats, Ks)]
        campos = as_numpy(torch.linalg.inv(viewmats.detach().to(dtype))[:, :3, 3], dtype)
        fdt = arrays[0].dtype
        means2d = np.empty((c, n, 2), fdt)
        conics = np.empty((c, n, 3), fdt)
        depths = np.empty((c, n), fdt)
        radii = np.empty((c, n), np.int32)
        opac = np.empty((c, n), fdt)
        colors = np.empty((c, n, 3 if sh.shape[1] > 0 else 0), fdt)
        compensations = np.empty((c, n), fdt)
        launch(cpu_projection.project_forward, *arrays[:5], sh_degree, campos, *arrays[5:], width, height,
               eps2d, near_plane, far_plane, radius_clip, antialiased, means2d, conics, depths, radii, opac,
               colors, compensations)
        ctx.arrays = arrays
        ctx.campos = campos
        ctx.radii = radii
        ctx.settings = settings
        ctx.dtypes = [t.dtype for t in (means, quats, scales, opacities, sh)]
        radii_t = torch.from_numpy(radii)
        ctx.mark_non_differentiable(radii_t)
        return (torch.from_numpy(means2d), torch.from_numpy(conics), torch.from_numpy(depths),
                torch.from_numpy(opac), torch.from_numpy(colors), radii_t)

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_opac, v_colors, _v_radii):
        width, height, eps2d, _, _, _, sh_degree, antialiased = ctx.settings
        means, quats, scales, opacities, sh, viewmats, ks = ctx.arrays
        grads = [np.empty(a.shape, a.dtype) for a in (means, quats, scales, opacities, sh)]
        if v_colors.shape[-1] == 0:
            v_colors = torch.zeros(v_depths.shape + (3,), dtype=ctx.dtype)
        launch(cpu_projection.project_backward, means, quats, scales, opacities, sh, sh_degree, ctx.campos,
               viewmats, ks, width, height, eps2d, antialiased, ctx.radii,
               *(as_numpy(v, ctx.dtype) for v in (v_means2d, v_conics, v_depths, v_opac, v_colors)), *grads)
        out = [torch.from_numpy(g).to(dtype) if ctx.needs_input_grad[i] else None
               for i, (g, dtype) in enumerate(zip(grads, ctx.dtypes))]
        return (*out, None, None, None)


def compiled_project(
    means: Tensor, quats: Optional[Tensor], scales: Optional[Tensor], opacities: Tensor, colors: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int, near_plane: float = NEAR_PLANE, far_plane: float = FAR_PLANE,
    radius_clip: float = 0.0, eps2d: float = EPS2D, sh_degree: Optional[int] = None, rasterize_mode: str = "classic",
    camera_model: str = "pinhole", covars: Optional[Tensor] = None,
) -> Tuple[ProjectedGaussians, Dict[str, Tensor]]:
    """`projection.project` with the compiled kernels: same arguments and results.

    Falls back to `project` for explicit covariances, non-pinhole cameras, cameras that need gradients,
    per-camera colours with SH and more than degree 3.
    """
    per_gaussian_sh = sh_degree is not None and colors.dim() == 3 and sh_degree <= 3
    per_gaussian_colors = sh_degree is None and colors.dim() == 2
    if (covars is not None or camera_model != "pinhole" or viewmats.requires_grad or Ks.requires_grad
            or not (per_gaussian_sh or per_gaussian_colors) or rasterize_mode not in ("classic", "antialiased")):
        return project(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
                       radius_clip, eps2d, sh_degree, rasterize_mode, camera_model, covars)
    n, c = means.shape[0], viewmats.shape[0]
    sh = colors if per_gaussian_sh else colors.new_zeros(n, 0, 3)
    settings = (int(width), int(height), float(eps2d), float(near_plane), float(far_plane), float(radius_clip),
                int(sh_degree or 0), rasterize_mode == "antialiased")
    means2d, conics, depths, opac, cols, radii = _ProjectGaussians.apply(
        means, quats, scales, opacities, sh, viewmats, Ks, settings
    )
    if not per_gaussian_sh:
        cols = colors[None].expand(c, -1, -1)
    return flattened(means2d, conics, depths, opac, cols, radii)


def compiled_rasterization(*args, **kwargs) -> Tuple[Tensor, Tensor, Dict]:
    """`gsplat.rendering.rasterization` with compiled projection and compositing: same arguments and results."""
    return rasterize_with(compiled_compositor, *args, projector=compiled_project, **kwargs)
