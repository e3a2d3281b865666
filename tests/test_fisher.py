"""PUP Fisher blocks against the full autograd Jacobian of rendered images, and the +-1 probe estimator."""

import math

import pytest
import torch

from nerfstudio_pruning.errors import PruningRefused
from nerfstudio_pruning.scoring.fisher import SPATIAL_AND_APPEARANCE, fisher_blocks, fisher_scores, probe_fisher_blocks
from nerfstudio_pruning.scoring.pair_stats import view_pair_statistics
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.testing.synthetic import point_on_pixel_centre, orbit_cameras, random_gaussians
from nerfstudio_pruning.types import Views
pytestmark = pytest.mark.usefixtures("single_thread")

W = H = 16
VIEWS = 3
SH_DEGREE = 2
TILE = 8
BACKGROUND = torch.tensor([0.2, 0.4, 0.6])




def _scene(n=30, seed=0):
    g = random_gaussians(n, sh_degree=SH_DEGREE, extent=0.5, scale=0.12, seed=seed)
    g.opacity_logits = g.opacity_logits + 1.0
    viewmats, Ks = orbit_cameras(VIEWS, W, H, radius=2.0)
    # The 0.999 alpha clamp (where alpha stops depending on mean2d and conic) needs sigma < 1e-3: two nearly
    # opaque Gaussians centred exactly on a pixel centre of one view each.
    g.opacity_logits[:2] = 12.0
    g.log_scales[:2] = math.log(0.25)
    g.means[0] = point_on_pixel_centre(viewmats[0], Ks[0], 5, 7, 1.2)
    g.means[1] = point_on_pixel_centre(viewmats[1], Ks[1], 10, 9, 1.3)
    return g, viewmats, Ks


def _views(viewmats, Ks, background=None, width=W, height=H):
    return Views(viewmats, Ks, width, height, background)


def autograd_fisher(g, viewmats, Ks, width, height, rasterize_mode="classic", appearance=False):
    """F_i = sum over pixels and channels of grad I grad I^T, one autograd.grad per image entry; over (mean,
    log-scale), and with `appearance` also over (opacity logit, DC SH coefficients)."""
    means = g.means.detach().clone().requires_grad_(True)
    log_scales = g.log_scales.detach().clone().requires_grad_(True)
    logits = g.opacity_logits.detach().clone().requires_grad_(True)
    sh_dc = g.sh[:, 0].detach().clone().requires_grad_(True)
    leaves = (means, log_scales, logits, sh_dc) if appearance else (means, log_scales)
    size = 10 if appearance else 6
    fisher = torch.zeros(g.means.shape[0], size, size, dtype=torch.float64)
    for view in range(viewmats.shape[0]):
        image, _, _ = rasterization(
            means, g.quats, torch.exp(log_scales), torch.sigmoid(logits), torch.cat([sh_dc[:, None], g.sh[:, 1:]], 1),
            viewmats[view : view + 1], Ks[view : view + 1], width, height, sh_degree=SH_DEGREE, tile_size=TILE,
            backgrounds=BACKGROUND[None], rasterize_mode=rasterize_mode,
        )
        flat = image.reshape(-1)
        for k in range(flat.shape[0]):
            grads = torch.autograd.grad(flat[k], leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
            row = torch.cat([grad.reshape(grad.shape[0], -1) for grad in grads], dim=-1).double()
            fisher += row[:, :, None] * row[:, None, :]
    return fisher


def _per_gaussian_relative_error(estimate, reference):
    norms = reference.flatten(1).norm(dim=1)
    seen = norms > 0
    return ((estimate - reference).flatten(1).norm(dim=1)[seen] / norms[seen]).max().item()


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_fisher_blocks_match_autograd_jacobian(rasterize_mode):
    g, viewmats, Ks = _scene()
    n_clamped = sum(
        int(stats.clamped.sum())
        for stats in view_pair_statistics(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), tile_size=TILE)
    )
    assert n_clamped > 0, "scene should exercise the alpha clamp"

    fisher = fisher_blocks(g.as_gaussians(SH_DEGREE, rasterize_mode), _views(viewmats, Ks, BACKGROUND), tile_size=TILE,
                           progress=False)
    reference = autograd_fisher(g, viewmats, Ks, W, H, rasterize_mode)
    assert fisher.dtype == torch.float64 and fisher.shape == (30, 6, 6)
    assert (reference.flatten(1).norm(dim=1) > 0).sum() >= 25, "most Gaussians should be seen"
    # Float32 model: the reference Jacobian carries float32 rounding (measured ~2e-7).
    assert _per_gaussian_relative_error(fisher, reference) < 1e-4
    assert torch.equal(fisher, fisher.transpose(1, 2))


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_appearance_fisher_blocks_match_autograd_jacobian(rasterize_mode):
    """The 10x10 option: (mean, log-scale, opacity logit, base colour), including the opacity compensation of the
    antialiased mode and the colour clamp at 0."""
    g, viewmats, Ks = _scene()
    g.sh[3:8, 0] = -3.0  # base colour below 0 after the +0.5 offset: clamped, no colour gradient
    views = _views(viewmats, Ks, BACKGROUND)
    blocks = fisher_blocks(g.as_gaussians(SH_DEGREE, rasterize_mode), views, tile_size=TILE, progress=False,
                           params=SPATIAL_AND_APPEARANCE)
    reference = autograd_fisher(g, viewmats, Ks, W, H, rasterize_mode, appearance=True)
    assert blocks.shape == (30, 10, 10)
    assert reference[:, 7:, 7:].abs().sum() > 0 and reference[:, 6, 6].abs().sum() > 0
    assert _per_gaussian_relative_error(blocks, reference) < 1e-4
    spatial = fisher_blocks(g.as_gaussians(SH_DEGREE, rasterize_mode), views, tile_size=TILE, progress=False)
    assert torch.allclose(blocks[:, :6, :6], spatial, rtol=1e-12, atol=0)


def test_fisher_blocks_exact_in_float64():
    g, viewmats, Ks = _scene()
    g = type(g)(**{k: v.double() for k, v in g.__dict__.items()})
    viewmats, Ks = viewmats.double(), Ks.double()
    fisher = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND.double()), tile_size=TILE,
                           progress=False)
    reference = autograd_fisher(g, viewmats, Ks, W, H)
    # Measured ~2e-14: the two computations agree to rounding.
    assert _per_gaussian_relative_error(fisher, reference) < 1e-10


def test_downscale_equals_rendering_at_half_resolution():
    g, viewmats, Ks = _scene(n=20, seed=1)
    fisher = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND), downscale=2, tile_size=TILE,
                           progress=False)
    half_Ks = Ks.clone()
    half_Ks[:, :2, :] /= 2
    reference = autograd_fisher(g, viewmats, half_Ks, W // 2, H // 2)
    assert reference.abs().sum() > 0
    assert _per_gaussian_relative_error(fisher, reference) < 1e-4


def test_chunking_does_not_change_blocks():
    g, viewmats, Ks = _scene(n=20, seed=4)
    common = dict(tile_size=TILE, progress=False)
    whole = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND), **common)
    # Chunks of a few pairs must still keep every pixel whole (T and S need all of its pairs).
    sliced = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND), chunk_pairs=5, gaussian_chunk=3,
                           **common)
    assert whole.abs().sum() > 0
    # Only rounding differs (the segmented cumsums restart at other offsets): measured 2e-14.
    assert _per_gaussian_relative_error(sliced, whole) < 1e-12


def test_unseen_gaussian_scores_minus_inf_and_nan_raises():
    g, viewmats, Ks = _scene(n=12, seed=2)
    g.means[-1] = torch.tensor([0.0, -50.0, 0.0])  # far outside every camera's frustum
    fisher = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks), tile_size=TILE, progress=False)
    scores = fisher_scores(fisher)
    assert scores.dtype == torch.float64
    assert torch.all(fisher[-1] == 0)
    assert scores[-1] == -math.inf
    assert torch.isfinite(scores[:-1]).sum() >= 8

    broken = fisher.clone()
    broken[0, 1, 1] = math.nan
    broken[3, 0, 2] = math.inf
    with pytest.raises(PruningRefused, match="2 of 12"):
        fisher_scores(broken)


def test_probe_estimator_converges_to_exact_fisher():
    g, viewmats, Ks = _scene(n=20, seed=3)
    exact = fisher_blocks(g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND), tile_size=TILE, progress=False)

    def relative_error(n_probes, seed):
        estimate = probe_fisher_blocks(
            g.as_gaussians(SH_DEGREE), _views(viewmats, Ks, BACKGROUND), tile_size=TILE,
            n_probes=n_probes, generator=torch.Generator().manual_seed(seed), progress=False,
        )
        return ((estimate - exact).norm() / exact.norm()).item()

    # Averaged over seeds so the comparison of two noise levels does not hinge on one draw.
    few = sum(relative_error(4, seed) for seed in range(3)) / 3
    many = sum(relative_error(256, seed) for seed in range(3)) / 3
    # 64x the probes should give ~8x less error (measured 0.65 -> 0.095); allow for a 3-draw average's spread.
    assert many < few / 4
    assert many < 0.15


def test_gpu_scan_branches_give_the_same_pair_statistics(monkeypatch):
    # GPUs take the per-pixel running sums column by column and the pixel bounds by binary search (CUDA's scans
    # along an outer dimension and its 1-D scans with indices are sequential); forced here on CPU, every statistic
    # the scores read must equal the CPU branches' to rounding.
    import nerfstudio_pruning.render.pairs as pairs_module
    import nerfstudio_pruning.scoring.pair_stats as pair_stats_module

    g, viewmats, Ks = _scene()
    g = type(g)(**{k: v.double() for k, v in g.__dict__.items()})
    views = _views(viewmats.double(), Ks.double(), BACKGROUND.double())

    def statistics():
        return list(view_pair_statistics(g.as_gaussians(SH_DEGREE), views, tile_size=TILE))

    cpu = statistics()
    plain = (pairs_module.cumsum_first_dim, pairs_module.segment_starts, pairs_module.segment_ends)
    monkeypatch.setattr(pairs_module, "cumsum_first_dim", lambda values: plain[0](values, by_column=True))
    monkeypatch.setattr(pairs_module, "segment_starts", lambda keys: plain[1](keys, by_search=True))
    monkeypatch.setattr(pair_stats_module, "segment_ends", lambda keys: plain[2](keys, by_search=True))
    gpu_branches = statistics()
    assert len(cpu) == len(gpu_branches) > 0
    for a, b in zip(cpu, gpu_branches):
        for name, value in a.__dict__.items():
            torch.testing.assert_close(getattr(b, name), value, rtol=0, atol=1e-12, msg=name)
