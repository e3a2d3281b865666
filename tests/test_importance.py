"""VEDAL's leave-one-out identity against removing each Gaussian and re-rendering."""

import math

import pytest
import torch

from nerfstudio_pruning.render.pairs import find_pairs
from nerfstudio_pruning.scoring.importance import first_order_importance, leave_one_out_importance
from nerfstudio_pruning.scoring.pair_stats import project_gaussians, view_pair_statistics
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.testing.ranks import spearman
from nerfstudio_pruning.testing.synthetic import point_on_pixel_centre, GaussianSet, orbit_cameras, random_gaussians
from nerfstudio_pruning.types import Views
# One pytest-xdist worker runs this module: its module-scoped fixtures are made once.
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.xdist_group("importance")]

W = H = 16
VIEWS = 3
SH_DEGREE = 1
TILE = 8
N = 40
# float64 throughout: a loss change of 1e-4 on a loss of ~100 needs more than float32's 7 digits.
DTYPE = torch.float64
BACKGROUNDS = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.3], [0.5, 0.5, 0.5]], dtype=DTYPE)




def _views(viewmats, Ks, backgrounds=BACKGROUNDS):
    return Views(viewmats, Ks, W, H, backgrounds)


@pytest.fixture(scope="module")
def scene():
    g = random_gaussians(N, sh_degree=SH_DEGREE, extent=0.5, scale=0.12, seed=0, dtype=DTYPE)
    # Opaque enough that many pixels reach the T <= 1e-4 early stop, where the identity's caveat applies.
    g.opacity_logits = g.opacity_logits + 1.5
    viewmats, Ks = orbit_cameras(VIEWS, W, H, radius=2.0)
    viewmats, Ks = viewmats.to(DTYPE), Ks.to(DTYPE)
    # The 0.999 alpha clamp needs sigma < 1e-3: two nearly opaque Gaussians centred exactly on a pixel centre.
    g.opacity_logits[:2] = 12.0
    g.log_scales[:2] = math.log(0.25)
    g.means[0] = point_on_pixel_centre(viewmats[0], Ks[0], 5, 7, 1.2)
    g.means[1] = point_on_pixel_centre(viewmats[1], Ks[1], 10, 9, 1.3)
    target = random_gaussians(N, sh_degree=SH_DEGREE, extent=0.5, scale=0.12, seed=5, dtype=DTYPE)
    gt, _, _ = rasterization(**target.render_args(), **_render_kwargs(viewmats, Ks))
    return g, viewmats, Ks, gt


def _render_kwargs(viewmats, Ks):
    return dict(viewmats=viewmats, Ks=Ks, width=W, height=H, sh_degree=SH_DEGREE, backgrounds=BACKGROUNDS,
                tile_size=TILE)


def _loss(image, gt, loss):
    residual = image - gt
    return residual.abs().sum() if loss == "l1" else (residual * residual).sum()


@pytest.fixture(scope="module")
def brute_force(scene):
    """Per Gaussian: loss changes and render energy when it alone is removed, and whether the removal left
    every other composited pair as it was (no pair brought back from behind the early stop)."""
    g, viewmats, Ks, gt = scene
    kwargs = _render_kwargs(viewmats, Ks)
    args = g.render_args()
    full_image, _, _ = rasterization(**args, **kwargs)
    full_pairs = find_pairs(project_gaussians(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks)), VIEWS, W, H, TILE)
    full_set = set(zip(full_pairs.pixel.tolist(), full_pairs.row.tolist()))
    changes = {"l1": [], "l2": [], "energy": []}
    unaffected = []
    for i in range(N):
        opacities = args["opacities"].clone()
        opacities[i] = 0.0
        image, _, _ = rasterization(**{**args, "opacities": opacities}, **kwargs)
        for loss in ("l1", "l2"):
            changes[loss].append(float(_loss(image, gt, loss) - _loss(full_image, gt, loss)))
        changes["energy"].append(float(((image - full_image) ** 2).sum()))
        logits = g.opacity_logits.clone()
        logits[i] = -math.inf
        removed = GaussianSet(g.means, g.quats, g.log_scales, logits, g.sh)
        pairs = find_pairs(project_gaussians(removed.as_gaussians(SH_DEGREE), _views(viewmats, Ks)), VIEWS, W, H, TILE)
        others = {pair for pair in full_set if pair[1] % N != i}
        unaffected.append(set(zip(pairs.pixel.tolist(), pairs.row.tolist())) == others)
    return {k: torch.tensor(v, dtype=DTYPE) for k, v in changes.items()}, torch.tensor(unaffected)


def test_scene_exercises_clamp_and_early_stop(scene, brute_force):
    g, viewmats, Ks, _ = scene
    _, unaffected = brute_force
    n_clamped = sum(
        int(stats.clamped.sum())
        for stats in view_pair_statistics(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), tile_size=TILE)
    )
    assert n_clamped > 0
    assert 0 < int((~unaffected).sum()) < N // 2
    print(f"clamped pairs {n_clamped}, Gaussians whose removal revives pairs {int((~unaffected).sum())} of {N}")


def test_pair_statistics_reproduce_the_render(scene):
    g, viewmats, Ks, _ = scene
    image, _, _ = rasterization(**g.render_args(), **_render_kwargs(viewmats, Ks))
    flat = image.reshape(-1, 3)
    n_pairs = 0
    for view in range(VIEWS):
        for stats in view_pair_statistics(
            g.as_gaussians(SH_DEGREE), _views(viewmats, Ks)[view], tile_size=TILE, chunk_pairs=50,
        ):
            n_pairs += len(stats)
            assert torch.allclose(stats.pixel_color, flat[view * W * H + stats.pixel], rtol=0, atol=1e-12)
            # Front of each pixel: S + T alpha c accounts for the whole pixel.
            front = stats.transmittance == 1
            whole = stats.behind + (stats.transmittance * stats.alpha)[:, None] * stats.color
            assert torch.allclose(whole[front], stats.pixel_color[front], rtol=0, atol=1e-12)
    assert n_pairs > 0


@pytest.mark.parametrize("loss", ["l1", "l2", "energy"])
def test_identity_matches_brute_force_removal(scene, brute_force, loss):
    g, viewmats, Ks, gt = scene
    changes, unaffected = brute_force
    exact = changes[loss]
    importance = leave_one_out_importance(
        g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), gt_images=None if loss == "energy" else gt, loss=loss,
        tile_size=TILE, progress=False,
    )
    assert importance.shape == (N,) and importance.dtype == torch.float64
    relative = (importance - exact).abs() / exact.abs().clamp_min(1e-12)
    # Where the removal leaves every other pair in place the identity is exact (measured ~1e-12).
    assert relative[unaffected].max() < 1e-5
    # Elsewhere pairs come back from behind the early stop. Measured here: up to 3% error on single Gaussians,
    # ranking unchanged (Spearman 1.0).
    rho = spearman(importance, exact)
    assert rho >= 0.99
    print(f"{loss}: max relative error, unaffected {relative[unaffected].max():.1e}, at the early stop "
          f"{relative[~unaffected].max():.1e} ({int((~unaffected).sum())} of {N}); Spearman {rho:.5f}")


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_first_order_is_the_linearised_identity_without_clamped_pairs(scene, brute_force, loss):
    """-o dL/do = sum over pairs off the clamp of dL/dI . dI: checks the backward pass and the engine against
    each other, and shows what the first-order statistic drops."""
    g, viewmats, Ks, gt = scene
    first_order = first_order_importance(
        g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), gt_images=gt, loss=loss, tile_size=TILE, progress=False,
    )
    linearised = torch.zeros(N, dtype=DTYPE)
    for view in range(VIEWS):
        gt_flat = gt[view].reshape(-1, 3)
        for stats in view_pair_statistics(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks)[view], tile_size=TILE):
            residual = stats.pixel_color - gt_flat[stats.pixel]
            dloss_dpixel = torch.sign(residual) if loss == "l1" else 2 * residual
            term = (dloss_dpixel * stats.removal_delta()).sum(-1) * (~stats.clamped)
            linearised.index_add_(0, stats.gaussian, term)
    assert torch.allclose(first_order, linearised, rtol=1e-9, atol=1e-12)

    changes, _ = brute_force
    # A cheaper and rougher ranking than the identity's; reported, not a property of the code to pin down.
    print(f"{loss}: Spearman of first-order vs brute force {spearman(first_order, changes[loss]):.3f}")


def test_requires_ground_truth_for_image_losses(scene):
    g, viewmats, Ks, _ = scene
    with pytest.raises(ValueError, match="gt_images"):
        leave_one_out_importance(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), loss="l1", progress=False)
    with pytest.raises(ValueError, match="loss"):
        leave_one_out_importance(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), loss="huber", progress=False)
