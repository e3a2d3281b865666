"""The CPU rasterizer against a per-pixel brute-force loop written straight from gsplat's kernel rules."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from nerfstudio_pruning.render.constants import ALPHA_MAX
from nerfstudio_pruning.render.reference import torch_rasterization as cpu_rasterization
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

W, H, TILE = 24, 20, 8


def brute_force(means, quats, scales, opacities, sh, viewmats, Ks, width, height, sh_degree, tile_size,
                backgrounds=None, antialiased=False):
    """One pixel at a time, one Gaussian at a time, sequentially, as the CUDA kernel does."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, calc_compensations=antialiased)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    colors = torch.clamp_min(_spherical_harmonics(sh_degree, means[None] - campos[:, None], sh[None].expand(len(viewmats), -1, -1, -1)) + 0.5, 0)
    images, alphas = [], []
    for c in range(viewmats.shape[0]):
        opac = opacities * (comp[c] if comp is not None else 1.0)
        order = sorted([i for i in range(means.shape[0]) if radii[c, i] > 0], key=lambda i: (float(depths[c, i]), i))
        rows = []
        alpha_rows = []
        for y in range(height):
            row, arow = [], []
            for x in range(width):
                tx, ty = x // tile_size, y // tile_size
                T = torch.ones(())
                pix = torch.zeros(3)
                for i in order:
                    r = float(radii[c, i]) / tile_size
                    mx, my = float(means2d[c, i, 0]) / tile_size, float(means2d[c, i, 1]) / tile_size
                    if not (math.floor(mx - r) <= tx < math.ceil(mx + r) and math.floor(my - r) <= ty < math.ceil(my + r)):
                        continue
                    d = means2d[c, i] - torch.tensor([x + 0.5, y + 0.5])
                    sigma = 0.5 * (conics[c, i, 0] * d[0] ** 2 + conics[c, i, 2] * d[1] ** 2) + conics[c, i, 1] * d[0] * d[1]
                    alpha = torch.clamp_max(opac[i] * torch.exp(-sigma), ALPHA_MAX)
                    if sigma < 0 or alpha < 1.0 / 255.0:
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        break
                    pix = pix + T * alpha * colors[c, i]
                    T = T * (1 - alpha)
                if backgrounds is not None:
                    pix = pix + T * backgrounds[c]
                row.append(pix)
                arow.append(1 - T)
            rows.append(torch.stack(row))
            alpha_rows.append(torch.stack(arow))
        images.append(torch.stack(rows))
        alphas.append(torch.stack(alpha_rows)[..., None])
    return torch.stack(images), torch.stack(alphas)


def _scene(n=30, views=2, seed=0, sh_degree=2):
    g = random_gaussians(n, sh_degree=sh_degree, extent=0.5, scale=0.12, seed=seed)
    g.opacity_logits = g.opacity_logits + 1.0  # some pixels saturate, exercising the clamp and early stop
    viewmats, Ks = orbit_cameras(views, W, H, radius=2.0)
    return g, viewmats, Ks


@pytest.mark.parametrize("antialiased", [False, True])
def test_matches_brute_force_forward_and_gradients(antialiased):
    g, viewmats, Ks = _scene()
    g.requires_grad_()
    bg = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.3]])
    args = g.render_args()
    img, alpha, _ = cpu_rasterization(**args, viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2,
                                      tile_size=TILE, backgrounds=bg, packed=False,
                                      rasterize_mode="antialiased" if antialiased else "classic")
    ref_img, ref_alpha = brute_force(args["means"], args["quats"], args["scales"], args["opacities"], args["colors"],
                                     viewmats, Ks, W, H, 2, TILE, backgrounds=bg, antialiased=antialiased)
    assert img.shape == ref_img.shape == (2, H, W, 3)
    assert alpha.mean() > 0.2, "scene too empty to test anything"
    assert (img - ref_img).abs().max() < 2e-6
    assert (alpha - ref_alpha).abs().max() < 2e-6

    weights = torch.randn_like(img)
    leaves = [g.means, g.quats, g.log_scales, g.opacity_logits, g.sh]
    grads = torch.autograd.grad((img * weights).sum() + alpha.sum(), leaves, retain_graph=True)
    ref_grads = torch.autograd.grad((ref_img * weights).sum() + ref_alpha.sum(), leaves)
    for name, a, b in zip(["means", "quats", "log_scales", "opacity", "sh"], grads, ref_grads):
        scale = b.abs().max().clamp_min(1e-6)
        assert (a - b).abs().max() / scale < 1e-4, name


def test_packed_equals_unpacked_and_depth_modes():
    g, viewmats, Ks = _scene(seed=1)
    args = g.render_args()
    common = dict(viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=2, tile_size=TILE)
    a, aa, meta_u = cpu_rasterization(**args, **common, packed=False, render_mode="RGB+ED")
    b, ba, meta_p = cpu_rasterization(**args, **common, packed=True, render_mode="RGB+ED")
    assert torch.allclose(a, b) and torch.allclose(aa, ba)
    assert meta_u["radii"].shape == (2, 30) and meta_p["radii"].dim() == 1
    assert meta_p["means2d"].shape[0] == int((meta_u["radii"] > 0).sum())
    d, da, _ = cpu_rasterization(**args, **common, render_mode="D")
    # expected depth = accumulated depth / alpha; must lie between nearest and farthest visible depth
    assert torch.allclose(a[..., 3:] * aa, d, atol=1e-5)
    visible = meta_u["depths"][meta_u["radii"] > 0]
    covered = aa[..., 0] > 0.5
    assert (a[..., 3][covered] >= visible.min() - 1e-4).all() and (a[..., 3][covered] <= visible.max() + 1e-4).all()


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    g, viewmats, Ks = _scene(n=12, views=1, seed=2)
    g.requires_grad_()
    args = g.render_args()
    img, _, meta = cpu_rasterization(**args, viewmats=viewmats[:1], Ks=Ks[:1], width=W, height=H, sh_degree=2,
                                     tile_size=TILE, packed=False, absgrad=True)
    means2d = meta["means2d"]
    means2d.retain_grad()
    weights = torch.randn_like(img)
    (img * weights).sum().backward(retain_graph=True)
    absgrad = means2d.absgrad.clone()  # the per-pixel grads below fire the hook again
    grad = means2d.grad.clone()
    expected = torch.zeros_like(means2d)
    for y in range(H):
        for x in range(W):
            (gp,) = torch.autograd.grad((img[0, y, x] * weights[0, y, x]).sum(), means2d, retain_graph=True,
                                        allow_unused=True)
            if gp is not None:
                expected += gp.abs()
    assert expected.abs().sum() > 0
    assert torch.allclose(absgrad, expected, rtol=1e-4, atol=1e-7)
    assert (absgrad >= grad.abs() * (1 - 1e-5) - 1e-7).all()


def test_entry_point_uses_cpu_path_on_cpu_and_handles_empty_views():
    g, viewmats, Ks = _scene(n=10, views=1)
    args = g.render_args()
    behind = torch.eye(4)[None]
    behind[0, 2, 3] = -10.0  # every Gaussian behind the camera
    img, alpha, meta = rasterization(**args, viewmats=behind, Ks=Ks[:1], width=W, height=H, sh_degree=2,
                                     backgrounds=torch.tensor([[0.3, 0.5, 0.7]]))
    assert meta["n_pairs"] == 0
    assert torch.allclose(img, torch.tensor([0.3, 0.5, 0.7]).expand_as(img))
    assert alpha.abs().max() == 0


def test_memory_follows_composited_pairs_not_pixels_times_gaussians():
    """Pairs per pixel stay bounded by the early stop however many Gaussians lie behind."""
    viewmats, Ks = orbit_cameras(1, 32, 32, radius=2.0)
    counts = []
    for n in (200, 3200):
        g = random_gaussians(n, sh_degree=0, extent=0.4, scale=0.08, seed=3)
        g.opacity_logits = g.opacity_logits.abs() + 3.0
        _, _, meta = cpu_rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=32, height=32, sh_degree=0)
        counts.append(meta["n_pairs"])
    # 16x more Gaussians, far fewer than 16x more pairs: occluded ones are never composited.
    assert counts[1] < 4 * counts[0]
    assert counts[1] < 0.05 * 32 * 32 * 3200
