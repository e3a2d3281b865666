"""(d) What else needs a GPU: the pair list of the CUDA path, its memory in depth, the algorithm layers on CUDA
tensors, and scoring spread over two processes on one GPU.

- Pair lists: `find_pairs` on CUDA (gsplat's tile kernel, depth batches with the stop carried) against the torch
  path on the CPU for the same projected Gaussians, and against gsplat's kernel called once over all depth
  batches (the list gsplat's own forward pass composites). Differences can only come from float32 rounding at
  alpha = 1/255 or T = 1e-4 (gsplat uses fast-math exp); they are counted.
- Memory in depth: a synthetic view with 16 and 512 full-frame layers; the peak of `find_pairs` must not follow
  the number of layers (gsplat path and torch path on the device).
- Algorithm layers on CUDA: removal with Adam state (`removal.remove_gaussians`), VEDAL's controller with its
  gate, float32 window and state round trip, the retention head's forward and backward, PUP's lowest-fraction
  mask.
- Two processes (gloo, CUDA tensors, one GPU) score like one process (`scoring.accumulate.sum_over_views`).
  nccl needs two GPUs and is not checked.

    python benchmarks/gpu/check_pairs_and_layers.py [--device cuda|cpu] [--quick] [--out DIR]
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

from kit_common import KIT_DIR, REPO_ROOT, Results, orbit_scene, parse_args, timed_peak

import torch

MAX_PAIR_DIFFERENCE = 1e-5  # fraction of pairs


def pair_keys(pairs, device: str) -> torch.Tensor:
    """Each (pixel, row) pair as one int64, on `device`: comparing lists of tens of millions as Python sets of
    tuples costs minutes and gigabytes."""
    pixel, row = pairs.pixel.to(device), pairs.row.to(device)
    return pixel * (1 << 31) + row  # rows < 2^31, pixels < 2^32


def differing_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """|symmetric difference of the two key sets| / |b|."""
    a, b = torch.unique(a), torch.unique(b.to(a.device))
    common = int(torch.isin(a, b).sum())
    return (len(a) + len(b) - 2 * common) / max(len(b), 1)


def compare_pair_lists(results: Results, device: str, quick: bool) -> None:
    from nerfstudio_pruning.render.pairs import EnumerationStats, find_pairs
    from nerfstudio_pruning.scoring.pair_stats import project_gaussians

    # On a GPU the 200k case is compared with gsplat's one-pass list only: its CPU reference (2.2 billion
    # candidates) took most of four minutes on 16 threads and agreed to one pair in 38 million (H100,
    # docs/cuda_path.md section 8).
    cases = [(300, 2, 64, 48, True)] if quick else [
        (3000, 2, 128, 96, True), (30000, 1, 320, 240, True), (200000, 1, 960, 540, False)]
    for n, n_views, width, height, cpu_reference in cases:
        g, views = orbit_scene(n, n_views, width, height, device, seed=2, scale=0.05)
        with torch.no_grad():
            proj = project_gaussians(g.as_gaussians(2), views)
        stats = EnumerationStats()
        ours = find_pairs(proj, n_views, width, height, stats=stats)
        mine = pair_keys(ours, device)
        tag = f"{n} Gaussians, {n_views} views {width}x{height}"
        if cpu_reference or device == "cpu":
            proj_cpu = type(proj)(**{k: v.cpu() for k, v in proj.__dict__.items()})
            torch_path = find_pairs(proj_cpu, n_views, width, height, backend="torch")
            ordered = torch.equal(ours.pixel.cpu(), torch_path.pixel) and torch.equal(ours.row.cpu(), torch_path.row)
            differing = differing_fraction(mine, pair_keys(torch_path, device))
            results.check(f"pairs on {device} vs torch path on CPU [{tag}]", differing <= MAX_PAIR_DIFFERENCE,
                          pairs=len(ours), identical_lists=ordered, differing_fraction=differing,
                          kernel_calls=stats.batches, candidates=stats.candidates)
        else:
            results.skip(f"pairs on {device} vs torch path on CPU [{tag}]",
                         "CPU reference of this size takes minutes (agreed to 2.6e-8 on the H100, 2026-11-26)")
        if device == "cuda":
            single = single_pass_gsplat_pairs(proj, n_views, width, height)
            differing = differing_fraction(mine, pair_keys(single, device))
            results.check(f"pairs vs gsplat's kernel in one pass [{tag}]", differing <= MAX_PAIR_DIFFERENCE,
                          pairs_gsplat=len(single), differing_fraction=differing)
        else:
            results.skip(f"pairs vs gsplat's kernel in one pass [{tag}]", "--device cpu")


def single_pass_gsplat_pairs(proj, n_cameras, width, height, tile_size=16):
    """gsplat's `rasterize_to_indices_in_range` over every depth batch at once, transmittance 1: the pairs its
    forward kernel composites (the stop flag lives inside the one call)."""
    from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles, rasterize_to_indices_in_range

    from nerfstudio_pruning.render.pairs import Pairs

    n = proj.means2d.shape[0] // n_cameras
    shape = lambda t, *rest: t.reshape(n_cameras, n, *rest).float().contiguous()  # noqa: E731 - unpacked rows
    tile_w, tile_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    _, isect_ids, flatten_ids = isect_tiles(shape(proj.means2d, 2), proj.radii.reshape(n_cameras, n).int().contiguous(),
                                            shape(proj.depths), tile_size, tile_w, tile_h)
    offsets = isect_offset_encode(isect_ids, n_cameras, tile_w, tile_h)
    gauss, pixel, camera = rasterize_to_indices_in_range(
        0, 2**31 - 1, torch.ones(n_cameras, height, width, device=proj.means2d.device), shape(proj.means2d, 2),
        shape(proj.conics, 3), shape(proj.opacities), width, height, tile_size, offsets, flatten_ids)
    return Pairs(camera * width * height + pixel, camera * n + gauss)


def layered_projection(width, height, layers, device):
    """`layers` broad Gaussians, each over the whole view, one behind the other (opacity 0.9): every pixel has
    `layers` candidates and stops after four or five."""
    from nerfstudio_pruning.render.projection import ProjectedGaussians

    g = torch.Generator().manual_seed(0)
    means2d = torch.tensor([width / 2, height / 2]) + (torch.rand(layers, 2, generator=g) - 0.5) * 4
    std = width * (1.0 + torch.rand(layers, generator=g))
    conics = torch.stack([1 / std**2, 0.1 * (torch.rand(layers, generator=g) - 0.5) / std**2, 1 / std**2], dim=-1)
    proj = ProjectedGaussians(
        means2d=means2d, conics=conics, opacities=0.9 * (1 - 0.02 * torch.rand(layers, generator=g)),
        depths=1.0 + torch.arange(layers, dtype=torch.float32), radii=torch.ceil(3 * std).int(),
        colors=torch.zeros(layers, 3), camera_ids=torch.zeros(layers, dtype=torch.long),
        gaussian_ids=torch.arange(layers),
    )
    return type(proj)(**{k: v.to(device) for k, v in proj.__dict__.items()})


def memory_in_depth(results: Results, device: str, quick: bool) -> None:
    from nerfstudio_pruning.render.pairs import EnumerationStats, find_pairs

    width = height = 32 if quick else 1024
    # The default batches hold 2^20 (CPU) / 2^22 (CUDA) candidates: a quick run's small view needs smaller ones
    # for depth to matter.
    limits = dict(batch_candidates=2048, call_budget=2048) if quick else {}
    backends = ["gsplat", "torch"] if device == "cuda" else ["torch"]
    for backend in backends:
        peaks = {}
        # A gsplat call holds at least one full (tile, depth batch) cell, 256 Gaussians x 256 pixels, whatever the
        # budget: the quick view's layers start at 256, so that depth beyond one cell is what is compared.
        depths = (256, 1024) if quick and backend == "gsplat" else (16, 128 if quick else 512)
        for layers in depths:
            proj = layered_projection(width, height, layers, device)
            stats = EnumerationStats()
            pairs, seconds, peak = timed_peak(
                lambda: find_pairs(proj, 1, width, height, backend=backend, stats=stats, **limits), device,
                profile_cpu_memory=True)
            peaks[layers] = peak
            results.measure(backend=backend, layers=layers, width=width, height=height, seconds=round(seconds, 4),
                            peak_MB=round(peak / 2**20, 2), pairs=len(pairs), candidates=stats.candidates,
                            batches=stats.batches, peak_batch_candidates=stats.peak_batch_candidates)
        shallow, deep = peaks[min(peaks)], peaks[max(peaks)]
        results.check(f"{backend} path: peak memory flat in depth ({width}x{height}, {min(peaks)} vs {max(peaks)} layers)",
                      deep < 1.5 * shallow, peak_shallow_MB=shallow / 2**20, peak_deep_MB=deep / 2**20)


def layers_on_device(results: Results, device: str) -> None:
    from nerfstudio_pruning.removal import lowest_fraction_mask, remove_gaussians
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance
    from nerfstudio_pruning.vedal.controller import VedalConfig, VedalController
    from nerfstudio_pruning.vedal.retention_head import RetentionHead, gaussian_features, retention_regulariser

    g, views = orbit_scene(200, 4, 32, 24, device, seed=3)
    n = 200
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(g.means.clone()), "scales": torch.nn.Parameter(g.log_scales.clone()),
        "quats": torch.nn.Parameter(g.quats.clone()), "opacities": torch.nn.Parameter(g.opacity_logits[:, None].clone()),
        "features_dc": torch.nn.Parameter(g.sh[:, 0].clone()), "features_rest": torch.nn.Parameter(g.sh[:, 1:].clone()),
    })
    optimizers = {name: torch.optim.Adam([p], lr=1e-3) for name, p in params.items()}
    (sum(p.sum() for p in params.values())).backward()
    for opt in optimizers.values():
        opt.step()
    strategy_state = {"grad2d": torch.rand(n, device=device), "count": torch.ones(n, device=device)}
    scores = torch.rand(n, dtype=torch.float64, device=device)
    prune = lowest_fraction_mask(scores, 0.3)
    kept_means = params["means"][~prune].detach().clone()
    removed = remove_gaussians(params, optimizers, strategy_state, prune)
    adam_state = optimizers["means"].state[params["means"]]
    results.check("removal with Adam state on CUDA tensors" if device == "cuda" else "removal on CPU tensors",
                  removed == 60 and params["means"].shape[0] == 140 and torch.equal(params["means"].detach(), kept_means)
                  and adam_state["exp_avg"].shape[0] == 140 and strategy_state["grad2d"].shape[0] == 140
                  and params["means"].device.type == device, removed=removed)

    config = VedalConfig(finetune_start_step=0, hard_prune_step=40, importance_every=2, importance_views=2)
    vedal = VedalController(config, ssim_lambda=0.2, device=torch.device(device))
    gaussians = g.as_gaussians(2)

    def measure(view_indices):
        return leave_one_out_importance(gaussians, views[torch.tensor(view_indices, device=device)], loss="energy",
                                        progress=False)

    for step in range(12):
        vedal.before_step(step, n, len(views), measure)
    state = vedal.state_dict()
    restored = VedalController(config, ssim_lambda=0.2, device=torch.device(device))
    restored.load_state_dict(state)
    head = RetentionHead().to(device)
    logits = head(g.means, gaussian_features(g.opacity_logits, g.log_scales))
    gated = vedal.gated_mask(n)
    loss, _ = retention_regulariser(logits, torch.ones_like(gated), config.prior_keep_probability, config.kl_weight,
                                    config.sparsity_weight)
    loss.backward()
    sampled = vedal.sampled_opacity_logits(g.opacity_logits, logits.detach(), gated, 5)
    results.check(f"VEDAL controller, gate, window and retention head on {device}",
                  vedal.window.sums.dtype == torch.float32 and vedal.window.sums.device.type == device
                  and torch.equal(restored.window.sums.cpu(), vedal.window.sums.cpu())
                  and bool(torch.isfinite(sampled).all()) and head.output.weight.grad is not None
                  and logits.device.type == device, refreshes=vedal.refresh_count,
                  window_full=bool(vedal.window.full))


TWO_PROCESS_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {kit!r})
    from kit_common import orbit_scene, load_gsplat_cuda
    device = sys.argv[5]
    if device == "cuda":
        load_gsplat_cuda()
    from nerfstudio_pruning.scoring.fisher import fisher_blocks
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance

    def scores():
        g, views = orbit_scene(150, 5, 48, 36, device, seed=4)
        return {{"fisher": fisher_blocks(g.as_gaussians(2), views, progress=False).cpu(),
                 "loo": leave_one_out_importance(g.as_gaussians(2), views, loss="energy", progress=False).cpu()}}

    rank, world = int(sys.argv[1]), int(sys.argv[2])
    if world == 1:
        torch.save(scores(), sys.argv[4])
    else:
        dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=world)
        torch.save(scores(), sys.argv[4])
        dist.destroy_process_group()
""")


def two_processes(results: Results, device: str, out_dir) -> None:
    work = out_dir / "two_process_scoring"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "worker.py"
    script.write_text(TWO_PROCESS_WORKER.format(kit=str(KIT_DIR)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    rendezvous = work / "rendezvous"
    if rendezvous.exists():
        rendezvous.unlink()
    single = subprocess.run([sys.executable, str(script), "0", "1", "-", str(work / "single.pt"), device],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(rendezvous), str(work / f"rank{rank}.pt"),
                                 device], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for rank in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
    reference = torch.load(work / "single.pt", weights_only=True)
    ranks = [torch.load(work / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    errors = {key: max(float((r[key] - reference[key]).abs().max() / reference[key].abs().max()) for r in ranks)
              for key in reference}
    same = all(torch.equal(ranks[0][key], ranks[1][key]) for key in reference)
    results.check(f"two processes (gloo, {device} tensors) score like one", same and max(errors.values()) < 1e-6,
                  ranks_identical=same, **{f"{k}_max_error_over_largest": v for k, v in errors.items()})


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    results = Results("pairs_and_layers", args.device, args.out)
    results.guarded("pair lists", lambda: compare_pair_lists(results, args.device, args.quick))
    results.guarded("memory in depth", lambda: memory_in_depth(results, args.device, args.quick))
    results.guarded("algorithm layers", lambda: layers_on_device(results, args.device))
    results.guarded("two processes", lambda: two_processes(results, args.device, args.out))
    results.write()
    raise SystemExit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
