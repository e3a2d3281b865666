"""(c) Memory and time of scoring one view: 100k and 1M Gaussians, full HD and 1/4 resolution.

For each size, on one view of `kit_common.frustum_scene` (Gaussians filling the camera's frustum, a few pixels
wide at full HD), it measures the peak memory allocated above the model and the time of:
- `project`: projecting every Gaussian (torch projection and SH, no autograd);
- `pairs`: the pair list (`render.pairs.find_pairs`: gsplat's tile kernel on CUDA, the torch path on CPU), with
  what the enumeration went through (`EnumerationStats`): `enumeration_candidates` (gsplat path: pairs above
  1/255 the kernel returned for pixels not yet stopped; torch path: candidate pixels of the narrowed
  rectangles), the most held at once, pairs composited, kernel calls or batches, tile intersections;
- `fisher`, `leave_one_out` (L1 against a random image), `lightgaussian`: the scores for that one view;
- `render_step`: gsplat's (the dispatch's) forward and backward of the same view, for scale;
- where Fisher's time goes (on an H200 one view cost 500-2600 render steps, docs/cuda_path.md section 7): the
  seconds in its phases (`fisher_moments_s`: projection, pairs and the per-pair statistics summed per Gaussian;
  `fisher_jacobian_s`: the projection Jacobian; the rest is the A^T M A assembly and the view loop), and from
  torch's profiler over one more Fisher call the number of kernel launches and the ops that take the most device
  (CUDA) and host time.
Every score runs once on a small scene first, so the first size measured carries no warm-up (one-time kernel
builds and allocator growth). An out-of-memory error is recorded as such and the next measurement goes on.

    python benchmarks/gpu/bench_scoring_memory.py [--device cuda|cpu] [--quick] [--sizes 100k@1920x1080 ...]
"""

from __future__ import annotations

import gc

from kit_common import Results, frustum_scene, parse_args, synchronize, timed_peak

import torch

FULL_SIZES = ["100k@480x270", "100k@1920x1080", "1M@480x270", "1M@1920x1080"]
QUICK_SIZES = ["2k@64x36", "8k@128x72"]


def parse_size(text: str):
    count, resolution = text.split("@")
    scale = {"k": 1_000, "M": 1_000_000}.get(count[-1], 1)
    n = int(float(count[:-1]) * scale) if count[-1] in "kM" else int(count)
    width, height = (int(v) for v in resolution.split("x"))
    return n, width, height


def measure_size(results: Results, device: str, text: str, profile_cpu: bool) -> None:
    from nerfstudio_pruning.render import rasterization
    from nerfstudio_pruning.render.pairs import EnumerationStats, find_pairs
    from nerfstudio_pruning.scoring.baselines import lightgaussian_significance
    from nerfstudio_pruning.scoring.fisher import fisher_blocks
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance
    from nerfstudio_pruning.scoring.pair_stats import project_gaussians

    n, width, height = parse_size(text)
    gaussians, views = frustum_scene(n, width, height, device)
    gt = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1)).to(device)
    model_bytes = sum(t.numel() * t.element_size() for t in (gaussians.means, gaussians.quats, gaussians.log_scales,
                                                             gaussians.opacity_logits, gaussians.sh))
    row = {"size": text, "gaussians": n, "width": width, "height": height, "model_MB": model_bytes / 2**20}

    def run(name, fn):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            result, seconds, peak = timed_peak(fn, device, profile_cpu)
        except torch.cuda.OutOfMemoryError as err:
            row[f"{name}_s"], row[f"{name}_peak_MB"] = None, f"out of memory: {str(err).splitlines()[0][:160]}"
            return None
        row[f"{name}_s"] = round(seconds, 4)
        row[f"{name}_peak_MB"] = None if peak is None else round(peak / 2**20, 1)
        return result

    with torch.no_grad():
        proj = run("project", lambda: project_gaussians(gaussians, views))
    if proj is not None:
        stats = EnumerationStats()
        # find_pairs is what enumerate_pairs runs on CUDA (and on CPU with NSP_CPU_RASTERIZER=torch).
        pairs = run("pairs", lambda: find_pairs(proj, 1, width, height, stats=stats))
        if pairs is not None:
            row.update(pairs=len(pairs), enumeration_candidates=stats.candidates, enumeration_batches=stats.batches,
                       tile_intersections=stats.tile_intersections, peak_batch_candidates=stats.peak_batch_candidates,
                       peak_call_bound=stats.peak_batch_bound,
                       pairs_per_pixel=round(len(pairs) / (width * height), 2),
                       candidates_per_pixel=round(stats.candidates / (width * height), 2))
        del pairs, proj
    run("fisher", lambda: fisher_blocks(gaussians, views, progress=False))
    try:
        row.update(fisher_phases(gaussians, views, device))
    except torch.cuda.OutOfMemoryError as err:
        row["fisher_phases"] = f"out of memory: {str(err).splitlines()[0][:160]}"
    run("leave_one_out", lambda: leave_one_out_importance(gaussians, views, gt_images=gt, loss="l1", progress=False))
    run("lightgaussian", lambda: lightgaussian_significance(gaussians, views))

    def render_step():
        means = gaussians.means.detach().clone().requires_grad_(True)
        image, _, _ = rasterization(means, gaussians.quats, gaussians.scales, gaussians.opacities, gaussians.sh,
                                    views.viewmats, views.Ks, width, height, sh_degree=gaussians.sh_degree)
        image.sum().backward()
        synchronize(device)
        return None

    run("render_step", render_step)
    results.measure(**row)


def fisher_phases(gaussians, views, device: str) -> dict:
    """Seconds of one Fisher call in its phases, and its kernel launches and heaviest ops under the profiler."""
    import time

    from nerfstudio_pruning.scoring import fisher

    seconds = {"moments": 0.0, "jacobian": 0.0}
    originals = fisher.gradient_moments, fisher.projection_jacobian

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize(device)
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    fisher.gradient_moments = timed("moments", originals[0])
    fisher.projection_jacobian = timed("jacobian", originals[1])
    try:
        synchronize(device)
        start = time.perf_counter()
        fisher.fisher_blocks(gaussians, views, progress=False)
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        fisher.gradient_moments, fisher.projection_jacobian = originals
    out = {"fisher_moments_s": round(seconds["moments"], 4), "fisher_jacobian_s": round(seconds["jacobian"], 4),
           "fisher_rest_s": round(total - seconds["moments"] - seconds["jacobian"], 4)}
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fisher.fisher_blocks(gaussians, views, progress=False)
        synchronize(device)
    events = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["fisher_kernel_launches"] = len(kernels)
        by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:6]
        out["fisher_top_device_ops"] = "; ".join(f"{e.key} x{e.count} {e.self_device_time_total / 1e3:.0f} ms"
                                                 for e in by_device)
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    out["fisher_top_host_ops"] = "; ".join(f"{e.key} x{e.count} {e.self_cpu_time_total / 1e3:.0f} ms" for e in by_host)
    return out


def warm_up(device: str) -> None:
    """Every measured call once on a small scene, unrecorded."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        measure_size(Results("warm-up", device, None), device, QUICK_SIZES[0], profile_cpu=False)


def main() -> None:
    def extra(parser):
        parser.add_argument("--sizes", nargs="+", default=None, help="e.g. 100k@1920x1080 1M@480x270")

    args = parse_args(__doc__.splitlines()[0], extra)
    results = Results("scoring_memory", args.device, args.out)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    profile_cpu = args.device == "cpu" and args.quick  # the profiler's memory events are slow on big runs
    warm_up(args.device)
    for text in sizes:
        results.guarded(f"scoring one view at {text}", lambda text=text: measure_size(results, args.device, text,
                                                                                       profile_cpu))
    # A measurement passes when every stage finished (out-of-memory is a result, recorded, not a pass).
    for row in results.measurements:
        finished = all(row.get(f"{stage}_s") is not None
                       for stage in ("project", "pairs", "fisher", "leave_one_out", "lightgaussian", "render_step"))
        results.check(f"every stage fits at {row['size']}", finished,
                      **{k: v for k, v in row.items() if k.endswith("_peak_MB") or k.endswith("_s")})
    results.write()
    raise SystemExit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
