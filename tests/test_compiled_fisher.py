"""The compiled passes of the Fisher score against the torch computations they replace on CPU.

- Gradient moments: `compiled_gradient_moments` (one pass over the tile lists) against the enumerated pairs'
  statistics summed by `sum_over_pairs`, on the same projection. Both evaluate the same float64 formulas on the
  same pairs and differ only in how T is obtained (division back to front against a float64 log-sum) and in the
  order of additions: measured <= 4e-12 relative per Gaussian on random scenes and a median of 3e-11 on a trained
  143k-Gaussian model, so 1e-9 here. On trained models a few Gaussians whose moments are ~1e-12 (colour behind
  nearly equal to colour in front, so beta cancels) differ by up to 1e-7 relative, 2e-19 absolute: the trained-run
  test bounds each column's error relative to that column's largest value in the view instead.
- Projection Jacobian: `compiled_projection_jacobian` (one backward pass per projected component) against forward
  mode through gsplat's torch projection, both in float64: measured 3e-16, bound 1e-12.
The end-to-end Fisher blocks through these passes are checked against autograd in tests/test_fisher.py.
"""

import dataclasses
import math

import pytest
import torch

from nerfstudio_pruning.render.dispatch import enumerate_pairs
from nerfstudio_pruning.scoring import cpu_moments as compiled
from nerfstudio_pruning.scoring.cpu_moments import compiled_gradient_moments
from nerfstudio_pruning.scoring import fisher
from nerfstudio_pruning.scoring.pair_stats import project_gaussians, sum_over_pairs, view_pair_statistics
from nerfstudio_pruning.testing.synthetic import orbit_cameras, point_on_pixel_centre, random_gaussians
from nerfstudio_pruning.types import Views

pytestmark = pytest.mark.usefixtures("single_thread")

W, H = 40, 28
BACKGROUND = torch.tensor([0.2, 0.4, 0.6])


def _scene(mode="classic", n=200, seed=0):
    g = random_gaussians(n, sh_degree=3, extent=0.5, scale=0.08, seed=seed)
    g.opacity_logits = g.opacity_logits + 1.0
    viewmats, Ks = orbit_cameras(3, W, H, radius=2.0)
    # On the 0.999 clamp (sigma < 1e-3 needs a centre on a pixel centre), and a clamped base colour.
    g.opacity_logits[:2] = 12.0
    g.log_scales[:2] = math.log(0.25)
    g.means[0] = point_on_pixel_centre(viewmats[0], Ks[0], 5, 7, 1.2)
    g.means[1] = point_on_pixel_centre(viewmats[0], Ks[0], 20, 9, 1.3)
    g.sh[3:8, 0] = -3.0
    g.means[-5:] = torch.tensor([0.0, 40.0, 0.0])  # far above every camera's view: culled (radius 0)
    return dataclasses.replace(g.as_gaussians(3), rasterize_mode=mode), viewmats, Ks


def _relative_per_row(estimate, reference):
    norms = reference.flatten(1).norm(dim=1)
    seen = norms > 0
    return ((estimate - reference).flatten(1).norm(dim=1)[seen] / norms[seen]).max().item()


def _pair_list_moments(gaussians, view, proj, tile_size):
    pairs = enumerate_pairs(proj, 1, view.width, view.height, tile_size)
    return sum_over_pairs(proj, pairs, view, len(gaussians), fisher._compact_m_contributions)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("tile_size", [8, 16])
@pytest.mark.parametrize("background", [None, BACKGROUND])
def test_moments_match_the_pair_statistics(mode, tile_size, background):
    gaussians, viewmats, Ks = _scene(mode)
    for view_index in range(3):
        view = Views(viewmats, Ks, W, H, background)[view_index]
        proj = project_gaussians(gaussians, view)
        rows = compiled_gradient_moments(proj, 1, W, H, tile_size, view.backgrounds)
        reference = _pair_list_moments(gaussians, view, proj, tile_size)
        assert rows.shape == reference.shape == (len(gaussians), 22 + 6 * 3)
        assert torch.equal(rows[:, -1] > 0, reference[:, -1] > 0), "the same Gaussians composite"
        assert int((reference[:, -1] > 0).sum()) > 50
        assert _relative_per_row(rows, reference) < 1e-9


def test_the_clamp_and_the_background_are_exercised():
    """The scene above reaches the cases the formulas single out, so the comparison above covers them: pairs with
    alpha on its clamp (no gradient through q, but w^2 counts) and a background that changes S."""
    gaussians, viewmats, Ks = _scene()
    view = Views(viewmats, Ks, W, H, BACKGROUND)[0]
    n_clamped = sum(int(stats.clamped.sum()) for stats in view_pair_statistics(gaussians, view, tile_size=8))
    assert n_clamped > 0
    proj = project_gaussians(gaussians, view)
    with_background = compiled_gradient_moments(proj, 1, W, H, 8, view.backgrounds)
    black = compiled_gradient_moments(proj, 1, W, H, 8, None)
    assert not torch.allclose(with_background, black)


def test_batches_of_entries_change_nothing(monkeypatch):
    gaussians, viewmats, Ks = _scene(seed=3)
    view = Views(viewmats, Ks, W, H, BACKGROUND)[1]
    proj = project_gaussians(gaussians, view)
    whole = compiled_gradient_moments(proj, 1, W, H, 8, view.backgrounds)
    monkeypatch.setattr(compiled, "MOMENT_BATCH_ENTRIES", 7)
    assert len(compiled._bin_batches(compiled.bin_tiles(proj, 1, W, H, 8).tile_offsets, 7)) > 3
    batched = compiled_gradient_moments(proj, 1, W, H, 8, view.backgrounds)
    assert torch.equal(whole, batched)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("params", [fisher.SPATIAL, fisher.SPATIAL_AND_APPEARANCE])
def test_compiled_projection_jacobian_matches_forward_mode(mode, params):
    gaussians, viewmats, Ks = _scene(mode)
    view = Views(viewmats, Ks, W, H)[2]
    radii = project_gaussians(gaussians, view).radii
    assert int((radii > 0).sum()) > 50 and int((radii == 0).sum()) > 0
    compiled_jac = fisher.projection_jacobian(gaussians, view, params, radii)
    forward_mode = fisher.projection_jacobian(gaussians, view, params)
    assert compiled_jac.shape == forward_mode.shape == (len(gaussians), 9, fisher.block_size(gaussians, params))
    visible = radii > 0
    assert _relative_per_row(compiled_jac[visible], forward_mode[visible]) < 1e-12
    assert compiled_jac[~visible].abs().sum() == 0


@pytest.mark.parametrize("params", [fisher.SPATIAL, fisher.SPATIAL_AND_APPEARANCE])
def test_compiled_block_assembly_matches_the_torch_products(params):
    """total[seen] += sym(A^T M A) in one kernel against the torch expansion of M and batched products (float64,
    same numbers in another order of additions: measured 2e-16, bound 1e-13); rows not seen stay as they were."""
    gaussians, viewmats, Ks = _scene("antialiased", seed=3)
    view = Views(viewmats, Ks, W, H, BACKGROUND)[1]
    proj, moments = fisher.gradient_moments(gaussians, view, 8)
    seen = torch.nonzero(moments[:, -1] > 0)[:, 0]
    assert 50 < len(seen) < len(gaussians)
    jac = fisher.projection_jacobian(gaussians.subset(seen), view, params, proj.radii[seen])
    size = jac.shape[-1]
    start = torch.randn(len(gaussians), size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    total = start.clone()
    compiled.compiled_add_fisher_blocks(moments[seen], jac, seen, total)
    block = jac.transpose(1, 2) @ fisher._expand_m(moments[seen], 3) @ jac
    expected = start.clone().index_add_(0, seen, 0.5 * (block + block.transpose(1, 2)))
    unseen = torch.ones(len(gaussians), dtype=torch.bool)
    unseen[seen] = False
    assert torch.equal(total[unseen], start[unseen])
    assert _relative_per_row(total[seen] - start[seen], expected[seen] - start[seen]) < 1e-13


def test_fisher_blocks_follow_the_backend(monkeypatch):
    """The compiled and the torch backend give the same blocks up to their projections' float32 rounding."""
    gaussians, viewmats, Ks = _scene("antialiased", seed=5)
    views = Views(viewmats, Ks, W, H, BACKGROUND)
    compiled_blocks = fisher.fisher_blocks(gaussians, views, tile_size=8, progress=False)
    monkeypatch.setenv("NSP_CPU_RASTERIZER", "torch")
    torch_blocks = fisher.fisher_blocks(gaussians, views, tile_size=8, progress=False)
    assert torch.equal(compiled_blocks.flatten(1).norm(dim=1) > 0, torch_blocks.flatten(1).norm(dim=1) > 0)
    # float32 projections differ by ~1e-7 relative; the blocks by up to ~1e-5 where a Gaussian sits near a cut.
    assert _relative_per_row(compiled_blocks, torch_blocks) < 1e-4


def test_moments_of_a_trained_run_match_the_pair_statistics(splatfacto_run):
    from nerfstudio_pruning.testing.run_tensors import load_run

    gaussians, views = load_run(splatfacto_run / "config.yml")
    gaussians = gaussians.detach()
    view = views[len(views) // 2]
    proj = project_gaussians(gaussians, view)
    rows = compiled_gradient_moments(proj, 1, view.width, view.height, 16, view.backgrounds)
    reference = _pair_list_moments(gaussians, view, proj, 16)
    seen = reference[:, -1] > 0
    assert int(seen.sum()) > 1000
    assert torch.equal(rows[:, -1] > 0, seen)
    scale = reference.abs().max(dim=0).values  # per column: the view's largest value
    assert ((rows - reference).abs() / scale).max() < 1e-8  # measured 3e-10 (snapshot of a 143k-Gaussian run)
