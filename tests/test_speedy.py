"""Speedy-Splat's score against brute force through the renderer's own autograd, and its ranking of an occluded
Gaussian."""

import math

import pytest
import torch

from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.scoring.pair_stats import project_gaussians, view_pair_statistics
from nerfstudio_pruning.scoring.scores import SCORE_KINDS, score_gaussians
from nerfstudio_pruning.scoring.speedy import speedy_scores
from nerfstudio_pruning.testing.synthetic import (
    GaussianSet,
    look_at_viewmat,
    orbit_cameras,
    point_on_pixel_centre,
    random_gaussians,
)
from nerfstudio_pruning.types import Views

pytestmark = pytest.mark.usefixtures("single_thread")

W = H = 16
TILE = 8
SH_DEGREE = 1
BACKGROUND = [0.2, 0.4, 0.6]


def _scene(n=12, seed=0, dtype=torch.float64):
    g = random_gaussians(n, sh_degree=SH_DEGREE, extent=0.5, scale=0.12, seed=seed, dtype=dtype)
    # Below the 0.999 clamp everywhere: there d alpha / d opacity is G, which the Jacobian reference divides out.
    g.opacity_logits = g.opacity_logits.clamp(max=3.0)
    viewmats, Ks = orbit_cameras(2, W, H, radius=2.0)
    views = Views(viewmats.to(dtype), Ks.to(dtype), W, H, torch.tensor(BACKGROUND, dtype=dtype))
    return g, views


def _render(g: GaussianSet, opacities, view: Views, rasterize_mode="classic"):
    image, _, _ = rasterization(
        g.means, g.quats, torch.exp(g.log_scales), opacities, g.sh, view.viewmats, view.Ks, view.width, view.height,
        sh_degree=SH_DEGREE, tile_size=TILE, backgrounds=view.background(0)[None], rasterize_mode=rasterize_mode,
    )
    return image[0]


def _footprints(g: GaussianSet, view: Views, rasterize_mode="classic"):
    """[H*W, N] G = exp(-sigma) of every Gaussian at every pixel centre, and [N] effective opacities."""
    with torch.no_grad():
        proj = project_gaussians(g.as_gaussians(SH_DEGREE, rasterize_mode), view)
    ys, xs = torch.meshgrid(torch.arange(view.height), torch.arange(view.width), indexing="ij")
    centres = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).to(proj.means2d.dtype) + 0.5
    d = proj.means2d[None] - centres[:, None]
    a, b, c = proj.conics[:, 0], proj.conics[:, 1], proj.conics[:, 2]
    sigma = 0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]
    return torch.exp(-sigma), proj.opacities


def jacobian_reference(g: GaussianSet, views: Views, rasterize_mode="classic"):
    """Per view, the Jacobian of every pixel's channel sum in the opacities, dL_p/do_i = G_ip dL_p/dalpha_ip (no
    clamp; with antialiasing alpha = o comp G, and comp cancels in o / G below), so
    dL_p/dG_ip = o_i J_pi / G_ip. Returns [N] scores with the square per pixel, and with the square per view."""
    opacities = torch.sigmoid(g.opacity_logits).detach()
    per_pixel = torch.zeros(len(opacities), dtype=torch.float64)
    per_view = torch.zeros_like(per_pixel)
    for k in range(len(views)):
        view = views[k]
        jac = torch.autograd.functional.jacobian(
            lambda o: _render(g, o, view, rasterize_mode).sum(-1).reshape(-1), opacities)
        footprint, effective = _footprints(g, view, rasterize_mode)
        # Only pairs the renderer composites (alpha >= 1/255); elsewhere the reference's Jacobian holds ~1e-18
        # of rounding, which dividing by a vanishing G would blow up.
        composited = effective * footprint >= 1.0 / 255.0
        grad = torch.where(composited, opacities * jac / footprint, torch.zeros_like(jac)).double()
        per_pixel += (grad**2).sum(0)
        per_view += grad.sum(0) ** 2
    return per_pixel, per_view


def _relative_error(estimate, reference):
    return ((estimate - reference).abs() / reference.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_matches_the_jacobian_of_the_torch_reference_in_float64(monkeypatch, rasterize_mode):
    monkeypatch.setenv("NSP_CPU_RASTERIZER", "torch")
    g, views = _scene()
    scores = speedy_scores(g.as_gaussians(SH_DEGREE, rasterize_mode), views, tile_size=TILE)
    per_pixel, per_view = jacobian_reference(g, views, rasterize_mode)
    seen = per_pixel > 0
    assert scores.dtype == torch.float64 and int(seen.sum()) >= 10, "most Gaussians should be seen"
    assert torch.all(scores[~seen] == 0)
    # Measured ~1e-13: the per-pair formula and autograd through the renderer agree to rounding.
    assert _relative_error(scores[seen], per_pixel[seen]) < 1e-9
    # The square is per pixel: squaring each view's summed gradient instead is far off.
    assert _relative_error(per_view[seen], per_pixel[seen]) > 0.1


def test_matches_the_jacobian_of_the_compiled_rasterizer_in_float32(monkeypatch):
    monkeypatch.setenv("NSP_CPU_RASTERIZER", "compiled")
    g, views = _scene(dtype=torch.float32)
    scores = speedy_scores(g.as_gaussians(SH_DEGREE), views, tile_size=TILE)
    per_pixel, _ = jacobian_reference(g, views)
    seen = per_pixel > 0
    assert int(seen.sum()) >= 10
    # The reference's float32 Jacobian and footprints carry float32 rounding (measured 2.4e-6); the score's
    # per-pair statistics are float64 from the same float32 projection.
    assert _relative_error(scores[seen], per_pixel[seen]) < 1e-4


def test_on_the_alpha_clamp_it_keeps_o_times_the_alpha_gradient(monkeypatch):
    """Where o G > 0.999 autograd gives no gradient; Speedy-Splat's kernel still counts o dL/dalpha. The leave-one-out
    change of a pixel is exactly -alpha dL/dalpha (docs/methods.md, section 4), clamp or not, so re-rendering
    without each Gaussian gives o dL/dalpha = -o Delta L / alpha with alpha = min(0.999, o G)."""
    monkeypatch.setenv("NSP_CPU_RASTERIZER", "torch")
    g, views = _scene(n=8, seed=3)
    g.opacity_logits = g.opacity_logits.clamp(max=0.5)  # keeps every pixel above the T <= 1e-4 stop
    g.opacity_logits[:2] = 12.0
    g.log_scales[:2] = math.log(0.25)
    g.means[0] = point_on_pixel_centre(views.viewmats[0], views.Ks[0], 5, 7, 1.2)
    g.means[1] = point_on_pixel_centre(views.viewmats[1], views.Ks[1], 10, 9, 1.3)
    gaussians = g.as_gaussians(SH_DEGREE)
    assert sum(int(s.clamped.sum()) for s in view_pair_statistics(gaussians, views, tile_size=TILE)) > 0

    opacities = torch.sigmoid(g.opacity_logits)
    reference = torch.zeros(len(opacities), dtype=torch.float64)
    for k in range(len(views)):
        view = views[k]
        full = _render(g, opacities, view).sum(-1).reshape(-1)
        footprint, effective = _footprints(g, view)
        alpha = torch.clamp(effective * footprint, max=0.999)
        for i in range(len(opacities)):
            change = _render(g, opacities.index_fill(0, torch.tensor([i]), 0.0), view).sum(-1).reshape(-1) - full
            composited = alpha[:, i] >= 1.0 / 255.0
            grad = torch.where(composited, -effective[i] * change / alpha[:, i], torch.zeros_like(change))
            reference[i] += (grad**2).sum()
    scores = speedy_scores(gaussians, views, tile_size=TILE)
    assert torch.all(reference[:2] > 0)
    # Measured 1.6e-12 (the leave-one-out difference loses a few digits to cancellation). Dropping the clamped
    # pairs, as the true derivative would, is off by 3e-3.
    assert _relative_error(scores[reference > 0], reference[reference > 0]) < 1e-8


def _occlusion_scene(with_occluder: bool):
    """One camera; four small, faint, bright Gaussians in plain sight; a tiny, nearly opaque bright one on the
    optical axis; in front of it (optionally) a large, opaque dark one covering the image."""
    colour_sh = lambda colour: (colour - 0.5) / 0.28209479177387814  # SH degree 0: colour = C0 sh + 0.5
    means = [[0.4, 0.3, -1.0], [-0.4, 0.3, -1.0], [0.4, -0.3, -1.0], [-0.4, -0.3, -1.0], [0.0, 0.0, 1.0]]
    scales = [0.05] * 4 + [0.01]
    opacity_logits = [math.log(0.3 / 0.7)] * 4 + [math.log(0.95 / 0.05)]
    colours = [1.0] * 5
    if with_occluder:
        means.append([0.0, 0.0, 0.0])
        scales.append(1.0)
        opacity_logits.append(12.0)
        colours.append(0.0)
    n = len(means)
    g = GaussianSet(
        means=torch.tensor(means, dtype=torch.float64),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n, dtype=torch.float64),
        log_scales=torch.log(torch.tensor(scales, dtype=torch.float64))[:, None].expand(n, 3).clone(),
        opacity_logits=torch.tensor(opacity_logits, dtype=torch.float64),
        sh=torch.tensor([[[colour_sh(c)] * 3] for c in colours], dtype=torch.float64),
    )
    viewmat = look_at_viewmat(torch.tensor([0.0, 0.0, -3.0]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0]))
    f = 0.5 * 32 / math.tan(math.radians(25))
    K = torch.tensor([[f, 0.0, 16.0], [0.0, f, 16.0], [0.0, 0.0, 1.0]])
    views = Views(viewmat[None].double(), K[None].double(), 32, 32, torch.zeros(3, dtype=torch.float64))
    return g.as_gaussians(0), views


def test_a_gaussian_hidden_behind_an_opaque_one_scores_lowest():
    gaussians, views = _occlusion_scene(with_occluder=True)
    assert "speedy" in SCORE_KINDS
    scores = score_gaussians("speedy", gaussians, views, progress=False)
    assert torch.equal(scores, speedy_scores(gaussians, views))
    hidden = 4
    assert int(torch.argmin(scores)) == hidden, scores
    # Not for its opacity: by opacity alone it would be kept before the four visible ones.
    assert int(torch.argmin(score_gaussians("opacity", gaussians, views))) != hidden

    unoccluded, views = _occlusion_scene(with_occluder=False)
    in_plain_sight = speedy_scores(unoccluded, views)
    assert int(torch.argmin(in_plain_sight)) != hidden
    assert scores[hidden] < 1e-2 * in_plain_sight[hidden]
