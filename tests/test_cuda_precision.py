"""The precision choices of the CUDA path, checked on CPU: float32 per-pair statistics with float64 reductions
(what a float32 model gets on CUDA) against float64 statistics and against autograd; chunk boundaries found in
one pass; VEDAL's importance window in float32, loading float64 windows of older checkpoints."""

from __future__ import annotations

import pytest
import torch

from nerfstudio_pruning.scoring.fisher import fisher_blocks
from nerfstudio_pruning.scoring.importance import leave_one_out_importance
from nerfstudio_pruning.scoring.pair_stats import (
    CPU_CHUNK_PAIRS,
    CUDA_CHUNK_PAIRS,
    _chunk_bounds,
    default_chunk_pairs,
    pair_statistics_dtype,
    statistics_dtype,
    view_pair_statistics,
)
from nerfstudio_pruning.vedal.controller import VedalConfig, VedalController
from test_fisher import BACKGROUND, SH_DEGREE, TILE, W, H, _per_gaussian_relative_error, _scene, _views, autograd_fisher

pytestmark = pytest.mark.usefixtures("single_thread")


def test_statistics_dtype_and_chunk_per_device():
    assert pair_statistics_dtype(torch.device("cpu"), torch.float32) == torch.float64
    assert pair_statistics_dtype(torch.device("cuda"), torch.float32) == torch.float32
    assert pair_statistics_dtype(torch.device("cuda"), torch.float64) == torch.float64
    with statistics_dtype(torch.float32):
        assert pair_statistics_dtype(torch.device("cpu"), torch.float64) == torch.float32
    assert pair_statistics_dtype(torch.device("cpu"), torch.float64) == torch.float64
    assert default_chunk_pairs(torch.device("cpu")) == CPU_CHUNK_PAIRS
    assert default_chunk_pairs(torch.device("cuda")) == CUDA_CHUNK_PAIRS


def test_float32_statistics_match_float64_and_autograd_fisher():
    g, viewmats, Ks = _scene()
    views = _views(viewmats, Ks, BACKGROUND)
    exact = fisher_blocks(g.as_gaussians(SH_DEGREE), views, tile_size=TILE, progress=False)
    with statistics_dtype(torch.float32):
        stats = next(iter(view_pair_statistics(g.as_gaussians(SH_DEGREE), views[0], tile_size=TILE)))
        assert stats.dI_dalpha.dtype == torch.float32 and stats.behind.dtype == torch.float32
        assert stats.clamped.any()  # the 0.999 clamp, where S / (1 - alpha) amplifies S x1000, is exercised
        float32 = fisher_blocks(g.as_gaussians(SH_DEGREE), views, tile_size=TILE, progress=False)
    assert float32.dtype == torch.float64
    difference = _per_gaussian_relative_error(float32, exact)
    # Measured 1.6e-7: float32 rounding of the per-pair products; the float64 sums add nothing.
    assert difference < 1e-5
    reference = autograd_fisher(g, viewmats, Ks, W, H)
    assert _per_gaussian_relative_error(float32, reference) < 1e-4
    print(f"float32 statistics: Fisher blocks within {difference:.1e} of float64 statistics")


@pytest.mark.parametrize("loss", ["l1", "energy"])
def test_float32_statistics_match_float64_leave_one_out(loss):
    from nerfstudio_pruning.render import rasterization

    g, viewmats, Ks = _scene(n=30, seed=6)
    views = _views(viewmats, Ks, BACKGROUND)
    target, _, _ = _scene(n=30, seed=7)
    gt, _, _ = rasterization(**target.render_args(), viewmats=viewmats, Ks=Ks, width=W, height=H,
                             sh_degree=SH_DEGREE, backgrounds=BACKGROUND[None].expand(len(views), -1), tile_size=TILE)
    gt = None if loss == "energy" else gt
    exact = leave_one_out_importance(g.as_gaussians(SH_DEGREE), views, gt, loss, tile_size=TILE, progress=False)
    with statistics_dtype(torch.float32):
        float32 = leave_one_out_importance(g.as_gaussians(SH_DEGREE), views, gt, loss, tile_size=TILE, progress=False)
    scale = exact.abs().max()
    assert scale > 0
    difference = float((float32 - exact).abs().max() / scale)
    assert difference < 1e-5
    assert torch.equal(torch.argsort(float32)[-10:], torch.argsort(exact)[-10:])  # the most important ten
    print(f"{loss}: float32 statistics within {difference:.1e} (of the largest) of float64 statistics")


def test_chunk_bounds_keep_pixels_whole_and_bounded():
    # pixel 7 has 40 pairs, more than the budget of 16: a chunk of its own.
    pixel = torch.tensor([0] * 3 + [1] * 5 + [2] * 9 + [7] * 40 + [8] * 2 + [9] * 11 + [12] * 6)
    bounds = _chunk_bounds(pixel, 16)
    assert bounds[0][0] == 0 and bounds[-1][1] == pixel.shape[0]
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    for start, end in bounds:
        assert end > start
        assert start == 0 or pixel[start] != pixel[start - 1]  # never splits a pixel
        assert end - start <= 16 + 40
    assert (17, 57) in bounds
    assert _chunk_bounds(pixel, 1000) == [(0, pixel.shape[0])]
    assert _chunk_bounds(pixel[:0], 16) == []


def test_importance_window_is_float32_and_loads_float64_checkpoints():
    config = VedalConfig(finetune_start_step=0, hard_prune_step=50, importance_every=1, importance_views=2)
    vedal = VedalController(config, ssim_lambda=0.2)
    importance = torch.tensor([1e-9, 3e-7, 2.5, 1e3, -4e-8], dtype=torch.float64)
    for step in range(3):
        vedal.before_step(step, 5, 4, lambda views: importance * len(views))
    assert vedal.window.sums.dtype == torch.float32
    assert torch.allclose(vedal.window.mean_per_view().double(), importance, rtol=1e-6, atol=0)

    state = vedal.state_dict()
    assert state["importance_sums"].dtype == torch.float32
    older = {**state, "importance_sums": state["importance_sums"].double() + 1e-12}  # saved by a float64 window
    restored = VedalController(config, ssim_lambda=0.2)
    restored.load_state_dict(older)
    assert restored.window.sums.dtype == torch.float32
    assert torch.equal(restored.window.sums, older["importance_sums"].float())
    assert restored.window.view_counts == vedal.window.view_counts
