"""Forward+backward time and peak memory of the compiled (numba) CPU rasterizer against the torch reference.

Measures, on one orbit camera looking at N random Gaussians (SH degree 3; the scene of
bench_cpu_rasterizer.py: centres in [-0.8, 0.8]^3, scale 0.06 * (1000/N)^(1/3)):
- one forward+backward (render, loss = sum(image * fixed random weights), backward to every raw parameter) for
  each N, resolution, backend (compiled, torch) and thread count: median of --repeats timed runs after one
  warm-up, and peak memory (the child's ru_maxrss minus its resident size just before the first render);
- first-call cost of the kernels: compiling into an empty numba cache, then loading from it in a new process;
- scoring enumeration of one view: `compiled_find_pairs` against `find_pairs` (and that they agree);
- where the compiled path's time goes at 50k Gaussians 256x256 (projection + SH, then each kernel).
`--exp-check` instead compares the kernels' exp with float32(exp(float64)) on all 1.09e9 float32 in [0, 6].

Every measurement runs in a fresh subprocess (ru_maxrss only grows within a process). The machine may be
shared: before each child the script waits (up to --max-wait s) for other processes to go quiet, reports the
cores they used while the child ran, and reruns a child disturbed by more than 0.3 cores (--retries).
torch runs predicted to take longer than --torch-budget-s per call (from the pairs and Gaussians, see
TORCH_NS_PER_PAIR_2_THREADS) are skipped and say so.

    .venv/bin/python benchmarks/rasterizer/bench_compiled_rasterizer.py            # everything (~5 minutes on 2 idle cores)
    .venv/bin/python benchmarks/rasterizer/bench_compiled_rasterizer.py --quick    # 1k and 50k at 64x64 and 256x256, 2 threads
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from nerfstudio_pruning.testing.machine import ForeignLoad, current_rss_bytes, wait_for_quiet

RESULT_TAG = "RESULT "
SH_DEGREE = 3
# The torch reference's forward+backward time on 2 threads, fitted to this script's first full run (1k 512x512:
# 592 ms for 3.3M pairs; 200k 64x64: 656 ms for 0.2M pairs; within 10% at 50k and 200k 256x256), 1.7x that on
# 1 thread. Used only to decide which torch runs to skip.
TORCH_NS_PER_PAIR_2_THREADS = 180.0
TORCH_NS_PER_GAUSSIAN_2_THREADS = 3200.0
TORCH_ONE_THREAD_FACTOR = 1.7
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1k and 50k Gaussians at 64 and 256, 2 threads, 3 repeats")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of Gaussians (1000 10000 50000 200000)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="square image sides (64 256 512)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (1 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 5)")
    p.add_argument("--backends", nargs="+", default=["compiled", "torch"], choices=["compiled", "torch"])
    p.add_argument("--torch-budget-s", type=float, default=2.5,
                   help="skip torch runs predicted to take longer than this per forward+backward")
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for other processes to go quiet")
    p.add_argument("--retries", type=int, default=1, help="reruns of a child disturbed by over 0.3 foreign cores")
    p.add_argument("--skip-compile", action="store_true", help="do not measure compile and cache-load time")
    p.add_argument("--skip-score", action="store_true", help="do not measure scoring enumeration")
    p.add_argument("--exp-check", action="store_true",
                   help="only compare the kernels' exp with float32(exp(float64)) on every float32 in [0, 6]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-breakdown", action="store_true", help="do not measure where the time goes at 50k/256")
    p.add_argument("--child", choices=["render", "compile", "score", "breakdown"], help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--res", type=int, help=argparse.SUPPRESS)
    p.add_argument("--nthreads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1000, 50000] if args.quick else [1000, 10000, 50000, 200000]
    if args.resolutions is None:
        args.resolutions = [64, 256] if args.quick else [64, 256, 512]
    if args.threads is None:
        args.threads = [2] if args.quick else [1, 2]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


# ----------------------------------------------------------------------------------------------- children


def make_scene(n: int, res: int, seed: int):
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians

    gs = random_gaussians(n, sh_degree=SH_DEGREE, extent=0.8, scale=0.06 * (1000.0 / n) ** (1.0 / 3.0), seed=seed)
    viewmats, Ks = orbit_cameras(1, res, res)
    return gs, viewmats, Ks


def child_render(args: argparse.Namespace) -> dict:
    """One backend, one configuration: warm-up, timed forward+backward repeats, peak memory."""
    import torch

    from nerfstudio_pruning.render.compiled import compiled_rasterization
    from nerfstudio_pruning.render.reference import torch_rasterization

    torch.set_num_threads(args.nthreads)
    fn = compiled_rasterization if args.backend == "compiled" else torch_rasterization
    gs, viewmats, Ks = make_scene(args.n, args.res, args.seed)
    gs.requires_grad_()
    weights = torch.rand(1, args.res, args.res, 3, generator=torch.Generator().manual_seed(args.seed + 1))
    info: dict = {}

    def step() -> None:
        for t in (gs.means, gs.quats, gs.log_scales, gs.opacity_logits, gs.sh):
            t.grad = None
        image, alpha, meta = fn(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=args.res, height=args.res,
                                sh_degree=SH_DEGREE)
        info["pairs"] = int(meta["n_pairs"])
        (image * weights).sum().backward()

    if args.backend == "compiled":  # load the kernels before measuring memory (their code is not the render's)
        tiny, tv, tk = make_scene(10, 16, 0)
        compiled_rasterization(**tiny.render_args(), viewmats=tv, Ks=tk, width=16, height=16, sh_degree=SH_DEGREE)
    gc.collect()
    rss_before = current_rss_bytes()
    step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(info, ms=1000 * statistics.median(times), times_ms=[round(1000 * t, 1) for t in times],
                peak_mb=max(0, peak - rss_before) / 2**20)


def child_compile(args: argparse.Namespace) -> dict:
    """Import, first call (compile or cache load) and second call of every kernel, on a tiny scene."""
    t0 = time.perf_counter()
    import torch

    import nerfstudio_pruning.render.cpu as compiled_kernels
    from nerfstudio_pruning.render.compiled import compiled_find_pairs, compiled_rasterization
    from nerfstudio_pruning.render.projection import project

    t_import = time.perf_counter() - t0
    torch.set_num_threads(args.nthreads)
    gs, viewmats, Ks = make_scene(200, 32, 0)
    gs.requires_grad_()

    def call() -> None:
        image, _, _ = compiled_rasterization(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=32, height=32,
                                             sh_degree=SH_DEGREE)
        image.sum().backward()
        with torch.no_grad():
            proj, _ = project(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=32, height=32, sh_degree=SH_DEGREE)
        compiled_find_pairs(proj, 1, 32, 32, 16)

    t1 = time.perf_counter()
    call()
    t_first = time.perf_counter() - t1
    t2 = time.perf_counter()
    call()
    t_second = time.perf_counter() - t2
    names = ["prepare_rows", "bin_rows", "sort_tiles", "rasterize_tiles", "backward_tiles", "reduce_rows"]
    stats = {n: [sum(getattr(compiled_kernels, n).stats.cache_hits.values()),
                 sum(getattr(compiled_kernels, n).stats.cache_misses.values())] for n in names}
    return dict(import_s=t_import, first_s=t_first, second_s=t_second, cache=stats)


def child_score(args: argparse.Namespace) -> dict:
    """Pair enumeration for one view, as the scores use it: compiled tile lists against the torch version."""
    import torch

    from nerfstudio_pruning.render.compiled import compiled_find_pairs
    from nerfstudio_pruning.render.pairs import find_pairs
    from nerfstudio_pruning.render.projection import pack, project

    torch.set_num_threads(args.nthreads)
    gs, viewmats, Ks = make_scene(args.n, args.res, args.seed)
    with torch.no_grad():
        proj, _ = project(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=args.res, height=args.res,
                          sh_degree=SH_DEGREE)
        proj = pack(proj)
        out = {}
        pairs = {}
        for name, fn in (("compiled", compiled_find_pairs), ("torch", find_pairs)):
            pairs[name] = fn(proj, 1, args.res, args.res, 16)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(proj, 1, args.res, args.res, 16)
                times.append(time.perf_counter() - t0)
            out[name + "_ms"] = 1000 * statistics.median(times)
            out[name + "_times_ms"] = [round(1000 * t, 1) for t in times]
    out["pairs"] = len(pairs["torch"])
    out["equal"] = bool(torch.equal(pairs["compiled"].pixel, pairs["torch"].pixel)
                        and torch.equal(pairs["compiled"].row, pairs["torch"].row))
    return out


def child_breakdown(args: argparse.Namespace) -> dict:
    """Where one compiled forward+backward spends its time: projection and SH (compiled; torch's for comparison),
    then each compositing kernel."""
    import numpy as np
    import torch

    from nerfstudio_pruning.render import compiled
    from nerfstudio_pruning.render.cpu import compositing as compiled_kernels
    from nerfstudio_pruning.render.cpu.launch import TILE_CHUNK, as_float32, launch
    from nerfstudio_pruning.render.projection import pack, project

    torch.set_num_threads(args.nthreads)
    gs, viewmats, Ks = make_scene(args.n, args.res, args.seed)
    gs.requires_grad_()
    weights = torch.rand(1, args.res, args.res, 3, generator=torch.Generator().manual_seed(args.seed + 1))

    def projection_with(project_fn):
        def run() -> None:  # what the rasterizer does before compositing, and its backward
            proj, _ = project_fn(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=args.res, height=args.res,
                                 sh_degree=SH_DEGREE)
            proj = pack(proj)
            (proj.means2d.sum() + proj.conics.sum() + proj.opacities.sum() + proj.colors.sum()).backward()
        return run

    with torch.no_grad():
        proj, _ = project(**gs.render_args(), viewmats=viewmats, Ks=Ks, width=args.res, height=args.res,
                          sh_degree=SH_DEGREE)
        proj = pack(proj)
    bins = compiled.bin_tiles(proj, 1, args.res, args.res, 16)
    colors = as_float32(proj.colors)
    fwd = compiled.run_forward(bins, colors, None)
    v_image = weights.numpy()
    v_alpha = np.zeros((1, args.res, args.res), np.float32)
    n_cols = compiled_kernels.GRAD_COLORS + colors.shape[1] + 2
    grads = np.empty((bins.n_entries, n_cols), np.float32)
    rows = np.empty((bins.gauss.shape[0], n_cols), np.float32)

    def backward() -> None:
        launch(compiled_kernels.backward_tiles, bins.gauss, colors, *bins.kernel_args(), np.zeros((1, 3), np.float32),
               False, fwd.transmittance, fwd.last_ids, v_image, v_alpha, bins.row_offsets, grads,
               compiled_kernels.LANES, chunk=TILE_CHUNK)

    def reduce() -> None:
        launch(compiled_kernels.reduce_rows, grads, bins.row_offsets, rows)

    out = {"entries": bins.n_entries}
    for name, fn in (("projection fwd+bwd (compiled)", projection_with(compiled.compiled_project)),
                     ("projection fwd+bwd (torch, the reference's)", projection_with(project)),
                     ("bin_tiles", lambda: compiled.bin_tiles(proj, 1, args.res, args.res, 16)),
                     ("forward kernel", lambda: compiled.run_forward(bins, colors, None)),
                     ("backward kernel", backward), ("reduce_rows", reduce)):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * statistics.median(times)
    return out


def exp_check() -> None:
    """Every float32 sigma in [0, 6] (1.09e9 values; alpha >= 1/255 needs sigma <= log(255) = 5.54): the
    kernels' exp(-sigma) against float32(numpy's float64 exp), and how often torch's float32 exp and libm's expf
    (numba's math.exp on float32) differ from that."""
    import numpy as np
    import torch
    from numba import njit

    from nerfstudio_pruning.render.cpu.compositing import exp_neg_f32

    @njit
    def kernel_exp(sigmas, out):
        for i in range(sigmas.size):
            out[i] = exp_neg_f32(sigmas[i])

    @njit
    def libm_expf(sigmas, out):
        for i in range(sigmas.size):
            out[i] = math.exp(-sigmas[i])

    end = int(np.float32(6.0).view(np.int32)) + 1
    total = kernel_bad = torch_off = libm_off = 0
    max_torch_ulp = 0
    for start in range(0, end, 1 << 25):
        sigmas = np.arange(start, min(end, start + (1 << 25)), dtype=np.int32).view(np.float32)
        exact = np.exp(-sigmas.astype(np.float64)).astype(np.float32)
        got = np.empty_like(sigmas)
        kernel_exp(sigmas, got)
        libm = np.empty_like(sigmas)
        libm_expf(sigmas, libm)
        t = torch.exp(-torch.from_numpy(sigmas)).numpy()
        total += sigmas.size
        kernel_bad += int((got != exact).sum())
        torch_off += int((t != exact).sum())
        libm_off += int((libm != exact).sum())
        max_torch_ulp = max(max_torch_ulp, int(np.abs(t.view(np.int32).astype(np.int64)
                                                     - exact.view(np.int32).astype(np.int64)).max()))
    print(f"float32 sigma in [0, 6]: {total:,} values; differing from float32(exp(float64)): kernels {kernel_bad:,}, "
          f"torch.exp {torch_off:,} ({100 * torch_off / total:.2f}%, at most {max_torch_ulp} ulp), "
          f"libm expf {libm_off:,} ({100 * libm_off / total:.3f}%)")


# ------------------------------------------------------------------------------------------------- parent


def spawn(args: argparse.Namespace, extra: List[str], env: Optional[dict] = None, retry: bool = True) -> dict:
    best = None
    for _ in range(args.retries + 1 if retry else 1):
        wait_for_quiet(args.max_wait)
        cmd = [sys.executable, os.path.abspath(__file__), "--seed", str(args.seed), "--repeats", str(args.repeats),
               *extra]
        with ForeignLoad() as others:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
        if result is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            result = {"error": f"exit {proc.returncode}: {tail[:200]}"}
        result["others_load"] = others.cores
        if best is None or result["others_load"] < best["others_load"]:
            best = result
        if "error" in result or result["others_load"] < 0.3:
            break
    return best


def machine_summary() -> List[str]:
    import numba
    import numpy
    import torch

    lines = []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L1d cache", "L2 cache",
                "L3 cache", "Hypervisor vendor")
        lines += ["lscpu: " + "; ".join(" ".join(l.split()) for l in lscpu if l.strip().startswith(keep))]
    except OSError:
        lines.append("lscpu: not available")
    import gsplat

    from nerfstudio_pruning.render.compiled import compiled_rasterization

    tiny, viewmats, Ks = make_scene(10, 16, 0)  # one launch, so that numba has picked its threading layer
    compiled_rasterization(**tiny.render_args(), viewmats=viewmats, Ks=Ks, width=16, height=16, sh_degree=SH_DEGREE)
    lines.append(f"python {platform.python_version()}, torch {torch.__version__}, numba {numba.__version__}, "
                 f"numpy {numpy.__version__}, gsplat {gsplat.__version__}, numba threading layer: "
                 f"{numba.threading_layer()} (NUMBA_THREADING_LAYER={os.environ.get('NUMBA_THREADING_LAYER')})")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "nerfstudio_pruning/render"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    lines.append(f"git commit {git.strip()}"
                 + (" (nerfstudio_pruning/render has uncommitted changes)" if dirty else ""))
    with open("/proc/loadavg") as f:
        lines.append(f"/proc/loadavg at start: {f.read().strip()}")
    return lines


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.child:
        if args.child == "render":
            result = child_render(args)
        elif args.child == "compile":
            result = child_compile(args)
        elif args.child == "breakdown":
            result = child_breakdown(args)
        else:
            result = child_score(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    if args.exp_check:
        exp_check()
        return
    t_start = time.monotonic()
    for line in machine_summary():
        print(line)
    print(f"scene: 1 orbit camera, SH degree {SH_DEGREE}, centres in [-0.8, 0.8]^3, scale 0.06 * (1000/N)^(1/3), "
          f"seed {args.seed}; {args.repeats} timed repeats after 1 warm-up; torch skipped above "
          f"{args.torch_budget_s} s predicted per call ({TORCH_NS_PER_PAIR_2_THREADS:.0f} ns/pair + "
          f"{TORCH_NS_PER_GAUSSIAN_2_THREADS / 1000:.1f} us/Gaussian at 2 threads, x{TORCH_ONE_THREAD_FACTOR} on 1)")

    rows = []
    for n in args.sizes:
        for res in args.resolutions:
            for threads in args.threads:
                row = {"n": n, "res": res, "threads": threads}
                for backend in args.backends:
                    if backend == "torch":
                        pairs = row.get("compiled", {}).get("pairs")
                        if pairs is not None:
                            predicted = 1e-9 * (pairs * TORCH_NS_PER_PAIR_2_THREADS
                                                + n * TORCH_NS_PER_GAUSSIAN_2_THREADS)
                            predicted *= TORCH_ONE_THREAD_FACTOR if threads == 1 else 1.0
                            if predicted > args.torch_budget_s:
                                row["torch"] = {"skipped": f"predicted {predicted:.1f} s per call"}
                                log(f"  N={n} {res}x{res} {threads} thr torch: skipped (predicted {predicted:.1f} s)")
                                continue
                    result = spawn(args, ["--child", "render", "--backend", backend, "--n", str(n), "--res",
                                          str(res), "--nthreads", str(threads)])
                    row[backend] = result
                    log(f"  N={n} {res}x{res} {threads} thr {backend}: "
                        + (result.get("error") or f"{result['times_ms']} ms, pairs {result['pairs']}, "
                                                  f"peak {result['peak_mb']:.0f} MB")
                        + f", others' load {result['others_load']:.2f} cores")
                rows.append(row)

    print()
    print("| N | resolution | pairs | threads | compiled ms | torch ms | speed-up | compiled peak MB | torch peak MB "
          "| others' load (cores) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c, t = row.get("compiled", {}), row.get("torch", {})

        def ms(d: dict, fmt: str) -> str:
            if "ms" in d:
                return format(d["ms"], fmt)
            return f"skipped ({d['skipped']})" if "skipped" in d else d.get("error", "-")

        def mb(d: dict) -> str:
            return f"{d['peak_mb']:.0f}" if "peak_mb" in d else "-"

        speed = f"{t['ms'] / c['ms']:.1f}x" if "ms" in c and "ms" in t else "-"
        loads = " / ".join(f"{d['others_load']:.2f}" for d in (c, t) if "others_load" in d)
        pairs = c.get("pairs", t.get("pairs"))
        print(f"| {row['n'] // 1000}k | {row['res']}x{row['res']} | {pairs:,} | {row['threads']} | {ms(c, '.1f')} | "
              f"{ms(t, '.0f')} | {speed} | {mb(c)} | {mb(t)} | {loads} |")

    if not args.skip_score:
        print()
        print("Scoring enumeration of one view (50k Gaussians, 256x256, packed rows, no grad):")
        for threads in args.threads:
            r = spawn(args, ["--child", "score", "--n", "50000", "--res", "256", "--nthreads", str(threads)])
            if "error" in r:
                print(f"  {threads} threads: {r['error']}")
                continue
            print(f"  {threads} threads: compiled_find_pairs {r['compiled_ms']:.1f} ms {r['compiled_times_ms']}, "
                  f"find_pairs {r['torch_ms']:.0f} ms {r['torch_times_ms']}, {r['torch_ms'] / r['compiled_ms']:.1f}x; "
                  f"{r['pairs']:,} pairs, identical: {r['equal']}; others' load {r['others_load']:.2f} cores")

    if not args.skip_breakdown:
        print()
        print("Where the time goes (50k Gaussians, 256x256, median per call):")
        for threads in args.threads:
            r = spawn(args, ["--child", "breakdown", "--n", "50000", "--res", "256", "--nthreads", str(threads)])
            if "error" in r:
                print(f"  {threads} threads: {r['error']}")
                continue
            parts = ", ".join(f"{k} {v:.1f} ms" for k, v in r.items() if k not in ("entries", "others_load"))
            print(f"  {threads} threads: {parts}; {r['entries']:,} tile entries; others' load "
                  f"{r['others_load']:.2f} cores")

    if not args.skip_compile:
        print()
        print("Kernel start-up (tiny scene: 200 Gaussians at 32x32; forward+backward and compiled_find_pairs):")
        with tempfile.TemporaryDirectory(prefix="nsp-numba-cache-") as cache_dir:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
            for label in ("empty cache (compiles)", "cache filled by the run above (loads)"):
                r = spawn(args, ["--child", "compile", "--nthreads", str(max(args.threads))], env=env, retry=False)
                if "error" in r:
                    print(f"  {label}: {r['error']}")
                    continue
                hits = sum(h for h, _ in r["cache"].values())
                misses = sum(m for _, m in r["cache"].values())
                print(f"  {label}: import {r['import_s']:.2f} s, first call {r['first_s']:.2f} s, second call "
                      f"{1000 * r['second_s']:.0f} ms; kernel cache hits {hits}, misses {misses}; "
                      f"others' load {r['others_load']:.2f} cores")

    with open("/proc/loadavg") as f:
        print(f"\n/proc/loadavg at end: {f.read().strip()}")
    print(f"total wall time {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
