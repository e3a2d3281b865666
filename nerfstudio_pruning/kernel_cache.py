"""Compile every numba kernel of the CPU path into numba's on-disk cache, once, before anything runs them.

The kernels (`render/cpu/`, `scoring/cpu_moments.py`) are compiled on first use and cached in `__pycache__`. On a
fresh checkout nothing is cached, and processes started side by side (the demo's two ns-train runs, the test suite's
workers and the ns-train runs they start) each compile the same kernels at once: 103 s of CPU for the whole set
on the 2-core VM with two training runs beside it, paid several times over by the suite on a clean clone. One
process that compiles them first and writes the cache lets every later process load them instead (a few seconds).
`scripts/run.sh` runs it before the demo and the tests; with two cores or more, the scores' kernels compile in a
second process beside the renderer's.

    python -m nerfstudio_pruning.kernel_cache

Tiny synthetic scenes drive the same entry points as training and scoring, with the argument types they use (the
training's float32 render and its backward, the Fisher moments and projection Jacobian in float64, float64
projection for the exactness tests), so each kernel is compiled for the signatures that will be asked of it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

KERNEL_MODULES = (
    "nerfstudio_pruning.render.cpu.projection",
    "nerfstudio_pruning.render.cpu.binning",
    "nerfstudio_pruning.render.cpu.compositing",
    "nerfstudio_pruning.scoring.cpu_moments",
)


def numba_kernels() -> Dict[str, object]:
    """Every numba kernel the kernel modules launch from Python, by `module.name`. Left out: the `@inline` helpers,
    compiled into their callers, and the private `_helpers` other kernels call, which a process that loads its
    callers from the cache never touches."""
    from numba.core.registry import CPUDispatcher

    kernels = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (isinstance(value, CPUDispatcher) and value.py_func.__module__ == name
                    and not attr.startswith("_")
                    and inspect.getsource(value.py_func).lstrip().splitlines()[0] != "@inline"):
                kernels[f"{name.rsplit('.', 1)[-1]}.{attr}"] = value
    return kernels


PARTS = ("render", "scores")


def run_every_kernel(parts: Sequence[str] = PARTS) -> None:
    """Render, back-propagate and score a tiny scene through the CPU path's entry points: `render` (the training's
    float32 render and its backward, float64 projection), `scores` (every score's passes)."""
    import torch

    from nerfstudio_pruning.render.compiled import compiled_project
    from nerfstudio_pruning.render.dispatch import rasterization
    from nerfstudio_pruning.scoring.importance import leave_one_out_importance
    from nerfstudio_pruning.scoring.scores import score_gaussians
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, random_gaussians
    from nerfstudio_pruning.types import Views

    torch.set_num_threads(1)
    width, height, n_views = 24, 20, 2
    viewmats, Ks = orbit_cameras(n_views, width, height, radius=2.0)
    background = torch.tensor([0.2, 0.4, 0.6])
    if "render" in parts:
        g = random_gaussians(40, sh_degree=1, extent=0.5, scale=0.12, seed=0).requires_grad_()
        image, _, _ = rasterization(**g.render_args(), viewmats=viewmats, Ks=Ks, width=width, height=height,
                                    sh_degree=1, backgrounds=background[None].expand(n_views, -1))
        image.sum().backward()
        # float64 projection: the float32 kernels' counterpart that the exactness tests compare against.
        leaves = {k: v.detach().double().requires_grad_() for k, v in g.render_args().items()
                  if torch.is_tensor(v) and v.is_floating_point()}
        proj, _ = compiled_project(**leaves, viewmats=viewmats.double(), Ks=Ks.double(), width=width, height=height,
                                   sh_degree=1)
        (proj.means2d.sum() + proj.conics.sum() + proj.colors.sum()).backward()
    if "scores" in parts:
        views = Views(viewmats, Ks, width, height, background)
        gaussians = random_gaussians(40, sh_degree=1, extent=0.5, scale=0.12, seed=0).as_gaussians(1)
        for kind in ("fisher", "lightgaussian", "speedy"):
            score_gaussians(kind, gaussians, views, progress=False)
        gt = torch.rand(n_views, height, width, 3, generator=torch.Generator().manual_seed(0))
        leave_one_out_importance(gaussians, views, gt_images=gt, loss="l1", progress=False)


def compiled_and_loaded(kernels: Dict[str, object]) -> Tuple[List[str], List[str]]:
    """The kernels this process compiled, and those it loaded from the cache."""
    compiled, loaded = [], []
    for name, kernel in sorted(kernels.items()):
        if sum(kernel.stats.cache_misses.values()):
            compiled.append(name)
        elif sum(kernel.stats.cache_hits.values()):
            loaded.append(name)
    return compiled, loaded


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nerfstudio_pruning.kernel_cache",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=PARTS, help="only this part (default: all, the scores in a second process "
                        "where there are two cores, so that both compile at once)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("numba") is None:
        print("kernel cache: numba is not installed, so the CPU path runs the torch reference; nothing to compile")
        return 0
    started = time.perf_counter()
    kernels = numba_kernels()
    if args.part:
        run_every_kernel((args.part,))
        return 0
    scores = None
    if (os.cpu_count() or 1) >= 2:
        scores = subprocess.Popen([sys.executable, "-m", "nerfstudio_pruning.kernel_cache", "--part", "scores"])
    run_every_kernel(("render",))
    if scores is not None and scores.wait() != 0:
        return scores.returncode
    run_every_kernel(("scores",))  # loaded from what the second process wrote, where there is one
    compiled, loaded = compiled_and_loaded(kernels)
    # A kernel this leaves out would still be compiled by every process that first needs it.
    missed = sorted(set(kernels) - set(compiled) - set(loaded))
    print(f"kernel cache: {len(compiled)} numba kernels compiled here, {len(loaded)} loaded from the cache"
          + (" (the scores' compiled by a second process)" if scores is not None else "")
          + f" in {time.perf_counter() - started:.1f} s"
          + (f"; never run, so not cached: {', '.join(missed)}" if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
