"""Dense baseline for the CPU rasterizer: one [pixels, Gaussians] alpha matrix per camera, colours by matmul.

This is the obvious way to write a differentiable Gaussian compositor in torch, and the yardstick the pair-list
compositor of `nerfstudio_pruning.render.reference` is measured against. Projection and SH are shared with the CPU
path (`render.projection.project`), and compositing applies the same gsplat 1.4.0 rules, but as masks over the full
matrix instead of by enumerating pairs:

- tile culling: a Gaussian only counts in the pixel rectangle its 3-sigma tiles cover;
- alpha = min(0.999, opacity * exp(-sigma)), entries with sigma < 0 or alpha < 1/255 zeroed;
- transmittance is an exclusive cumulative product along the depth-sorted Gaussian axis, and an entry is
  dropped once the transmittance after it would be <= 1e-4.

Memory is pixels x visible Gaussians x (the number of such matrices autograd keeps), whatever the pairs that
actually contribute, so it runs out of memory long before the CPU path does. `estimate_bytes` predicts the peak
so that callers can skip sizes that would not fit.

Run as a script to check it against the CPU path on a small case.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_pruning.render.constants import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN
from nerfstudio_pruning.render.projection import project

# Peak RSS growth of one forward+backward = fixed + per_entry * (pixels x visible Gaussians), float32, fitted to
# `bench_cpu_rasterizer.py --calibrate` on the 2-core benchmark machine: 64x64 and 128x128 with 1k-4k Gaussians
# gave 1.1 GB at 16.4M entries, 2.1 GB at 32.8M and 3.9 GB at 65.5M, i.e. about 260 MB + 58 B/entry (some 15
# float32 matrices alive at the peak). Both rounded up so that the budget check errs on the side of skipping.
FIXED_BYTES = 300 * 2**20
BYTES_PER_ENTRY = 64


def estimate_bytes(n_pixels: int, n_visible: int) -> int:
    """Predicted peak memory of one forward+backward of `dense_rasterization` for one camera."""
    return FIXED_BYTES + int(n_pixels) * int(n_visible) * BYTES_PER_ENTRY


def tile_pixel_rects(means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int) -> Tensor:
    """[x0, x1, y0, y1] pixel rectangle of the tiles each Gaussian's radius touches, as gsplat's isect_tiles.

    Written out here rather than imported from the CPU path, so that the check against it is a real one.
    """
    tile_r = radii.to(means2d.dtype) / tile_size
    tile_w, tile_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tx0 = torch.floor(means2d[:, 0] / tile_size - tile_r).clamp(0, tile_w)
    tx1 = torch.ceil(means2d[:, 0] / tile_size + tile_r).clamp(0, tile_w)
    ty0 = torch.floor(means2d[:, 1] / tile_size - tile_r).clamp(0, tile_h)
    ty1 = torch.ceil(means2d[:, 1] / tile_size + tile_r).clamp(0, tile_h)
    rect = torch.stack([tx0, tx1, ty0, ty1], dim=-1).long() * tile_size
    rect[:, :2] = rect[:, :2].clamp_max(width)
    rect[:, 2:] = rect[:, 2:].clamp_max(height)
    return rect


def _composite_camera(
    means2d: Tensor, conics: Tensor, opacities: Tensor, colors: Tensor, radii: Tensor, depths: Tensor,
    width: int, height: int, tile_size: int,
) -> Tuple[Tensor, Tensor]:
    visible = torch.nonzero(radii > 0).squeeze(1)
    # Stable sort so depth ties break by index, as gsplat and the CPU path do.
    visible = visible[torch.argsort(depths[visible], stable=True)]
    m = means2d[visible]
    con = conics[visible]
    opac = opacities[visible]
    col = colors[visible]

    ys, xs = torch.meshgrid(
        torch.arange(height, device=m.device), torch.arange(width, device=m.device), indexing="ij"
    )
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    dx = m[None, :, 0] - (xs.to(m.dtype)[:, None] + 0.5)
    dy = m[None, :, 1] - (ys.to(m.dtype)[:, None] + 0.5)
    sigma = 0.5 * (con[None, :, 0] * dx * dx + con[None, :, 2] * dy * dy) + con[None, :, 1] * dx * dy
    alpha = torch.clamp_max(opac[None, :] * torch.exp(-sigma), ALPHA_MAX)

    with torch.no_grad():
        rects = tile_pixel_rects(m, radii[visible], width, height, tile_size)
        in_tiles = (
            (xs[:, None] >= rects[None, :, 0]) & (xs[:, None] < rects[None, :, 1])
            & (ys[:, None] >= rects[None, :, 2]) & (ys[:, None] < rects[None, :, 3])
        )
        live = in_tiles & (sigma >= 0) & (alpha >= ALPHA_MIN)
        del in_tiles
    alpha = torch.where(live, alpha, torch.zeros((), dtype=alpha.dtype))
    del live

    t_after = torch.cumprod(1.0 - alpha, dim=1)
    t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], dim=1)
    # Transmittance only decreases along a pixel's row, so "T after <= 1e-4" is true from the stopping Gaussian
    # onwards: masking it reproduces gsplat's early exit, stopping Gaussian excluded.
    alpha = torch.where(t_after.detach() > TRANSMITTANCE_MIN, alpha, torch.zeros((), dtype=alpha.dtype))
    weight = alpha * t_before
    image = weight @ col
    # sum_i alpha_i T_i telescopes to 1 - prod(1 - alpha_i): the accumulated alpha without another matrix.
    acc = weight.sum(dim=1)
    return image.view(height, width, -1), acc.view(height, width, 1)


def dense_rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """RGB render of [C, H, W, D] colours and [C, H, W, 1] alphas with the dense compositor."""
    proj, unpacked = project(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane,
        eps2d=eps2d, sh_degree=sh_degree,
    )
    n_cams = viewmats.shape[0]
    n = means.shape[0]
    images, alphas = [], []
    for c in range(n_cams):
        rows = slice(c * n, (c + 1) * n)
        image, acc = _composite_camera(
            proj.means2d[rows], proj.conics[rows], proj.opacities[rows], proj.colors[rows], proj.radii[rows],
            proj.depths[rows], width, height, tile_size,
        )
        if backgrounds is not None:
            image = image + (1.0 - acc) * backgrounds[c]
        images.append(image)
        alphas.append(acc)
    return torch.stack(images), torch.stack(alphas)


def check_agreement(n: int = 300, width: int = 48, height: int = 40, seed: int = 0) -> dict:
    """Render one small scene with both compositors; max abs differences of image, alpha and gradients."""
    from nerfstudio_pruning.render import rasterization
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

    viewmats, Ks = orbit_cameras(2, width, height)
    weights = torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(seed + 1))
    results = {}
    for name in ("cpu", "dense"):
        gs = random_gaussians(n, sh_degree=3, scale=0.08, seed=seed).requires_grad_()
        kwargs = dict(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=3)
        if name == "cpu":
            image, alpha, _ = rasterization(**kwargs)
        else:
            image, alpha = dense_rasterization(**kwargs)
        (image * weights).sum().backward()
        results[name] = (image.detach(), alpha.detach(), gs)
    (img_c, alp_c, gs_c), (img_d, alp_d, gs_d) = results["cpu"], results["dense"]
    diffs = {"image": float((img_c - img_d).abs().max()), "alpha": float((alp_c - alp_d).abs().max())}
    for field in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        g_c, g_d = getattr(gs_c, field).grad, getattr(gs_d, field).grad
        scale = float(g_c.abs().max())
        diffs[f"grad {field} (rel.)"] = float((g_c - g_d).abs().max()) / max(scale, 1e-30)
    return diffs


def format_agreement(diffs: dict) -> str:
    return ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())


if __name__ == "__main__":
    torch.set_num_threads(2)
    d = check_agreement()
    print(f"dense vs CPU path, max abs difference: {format_agreement(d)}")
    if not math.isfinite(max(d.values())) or max(d["image"], d["alpha"]) > 1e-5:
        raise SystemExit("dense compositor disagrees with the CPU path")
