"""What the GPU kit's scripts share: arguments, the environment report, scenes, measurement and results.

The kit runs on a machine with Python, torch (CUDA), gsplat 1.4.0 and numpy only: no nerfstudio, no package
registry. It imports this checkout's algorithm layers (`nerfstudio_pruning.types/render/scoring/vedal/pup/
removal/errors`, which import neither nerfstudio nor numba when nothing dispatches to the compiled CPU kernel)
straight from the working tree. CPU references use the pure-torch rasterizer (NSP_CPU_RASTERIZER=torch) unless
numba is installed.

Every script takes `--device cuda|cpu` (cpu: the same code paths on CPU, to check the scripts on a machine
without a GPU; the CUDA-only comparisons are then recorded as skipped), `--quick` (small sizes) and `--out DIR`
(default $OUT/gpu_kit, else benchmarks/gpu/results). Each writes `<name>.json` (every number it measured, the
machine, versions and commit) and prints one line per check; its exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

KIT_DIR = Path(__file__).resolve().parent
REPO_ROOT = KIT_DIR.parents[1]
# this checkout's package, without installing it; NSP_KIT_INSTALLED=1 (the install check): the installed one
if str(REPO_ROOT) not in sys.path and os.environ.get("NSP_KIT_INSTALLED") != "1":
    sys.path.insert(0, str(REPO_ROOT))


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# The compiled CPU kernel needs numba, which the GPU machine lacks: CPU references use the torch reference then.
if "NSP_CPU_RASTERIZER" not in os.environ and not _numba_available():
    os.environ["NSP_CPU_RASTERIZER"] = "torch"

import torch  # noqa: E402


# -- gsplat's CUDA extension ------------------------------------------------------------------------------------------

EXTENSION_CACHE = KIT_DIR / "cache" / "gsplat_cuda"


def _extension_stamp() -> Dict[str, Any]:
    from importlib.metadata import version

    props = torch.cuda.get_device_properties(0)
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "gsplat": version("gsplat"),
            "python": platform.python_version(), "capability": f"{props.major}.{props.minor}"}


def load_gsplat_cuda() -> str:
    """Make gsplat's CUDA extension importable and say how.

    gsplat 1.4.0 is a pure-Python wheel that compiles its CUDA sources on first use (minutes). A build made on
    this kind of machine is kept in benchmarks/gpu/cache/gsplat_cuda/ (with the versions it was built for) and
    loaded from there as the `gsplat.csrc` module, which gsplat imports before it would compile.
    """
    so_path, stamp_path = EXTENSION_CACHE / "gsplat_cuda.so", EXTENSION_CACHE / "stamp.json"
    if "gsplat.csrc" not in sys.modules and so_path.exists() and stamp_path.exists():
        if json.loads(stamp_path.read_text()) == _extension_stamp():
            spec = importlib.util.spec_from_file_location("gsplat_cuda", so_path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["gsplat.csrc"] = module
        else:
            print(f"cached gsplat build in {EXTENSION_CACHE} is for {stamp_path.read_text().strip()}; rebuilding")
    start = time.perf_counter()
    from gsplat.cuda._backend import _C

    if _C is None:
        raise RuntimeError("gsplat has no CUDA extension: no nvcc on PATH, or its build failed (see above)")
    if sys.modules.get("gsplat.csrc") is _C:
        return f"loaded from {so_path}"
    built = Path(_C.__file__)
    EXTENSION_CACHE.mkdir(parents=True, exist_ok=True)
    if built.resolve() != so_path.resolve():
        shutil.copy2(built, so_path)
        stamp_path.write_text(json.dumps(_extension_stamp()) + "\n")
    return f"built or loaded by gsplat ({built}) in {time.perf_counter() - start:.0f} s; cached in {EXTENSION_CACHE}"


def parse_args(description: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT/gpu_kit)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu_kit" if os.environ.get("OUT") else KIT_DIR / "results"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.device == "cuda":
        print(f"gsplat CUDA extension: {load_gsplat_cuda()}", flush=True)
    return args


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = KIT_DIR / "COMMIT"  # run_all.sh writes it when the copy has no .git
    return stamp.read_text().strip() if stamp.exists() else "unknown (no git metadata in this copy)"


def environment(device: str) -> Dict[str, Any]:
    import gsplat

    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gsplat": gsplat.__version__,
        "numpy": __import__("numpy").__version__,
        "cpu_rasterizer": os.environ.get("NSP_CPU_RASTERIZER", "compiled"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "commit": git_commit(),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


@dataclass
class Results:
    """Checks and measurements of one script, written to <out>/<name>.json."""

    name: str
    device: str
    out: Path
    checks: List[Dict[str, Any]] = field(default_factory=list)
    measurements: List[Dict[str, Any]] = field(default_factory=list)

    def check(self, what: str, passed: bool, **numbers: Any) -> bool:
        self.checks.append({"check": what, "passed": bool(passed), **numbers})
        shown = ", ".join(f"{k}={_short(v)}" for k, v in numbers.items())
        print(f"[{'PASS' if passed else 'FAIL'}] {what}: {shown}", flush=True)
        return bool(passed)

    def skip(self, what: str, why: str) -> None:
        self.checks.append({"check": what, "passed": None, "skipped": why})
        print(f"[SKIP] {what}: {why}", flush=True)

    def error(self, what: str, err: BaseException) -> None:
        self.checks.append({"check": what, "passed": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-4000:]})
        print(f"[FAIL] {what}: {type(err).__name__}: {err}", flush=True)

    def measure(self, **numbers: Any) -> None:
        self.measurements.append(numbers)
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in numbers.items()), flush=True)

    @property
    def failed(self) -> bool:
        return any(c["passed"] is False for c in self.checks)

    def write(self) -> Path:
        path = self.out / f"{self.name}.json"
        payload = {"script": self.name, "environment": environment(self.device), "checks": self.checks,
                   "measurements": self.measurements}
        path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
        n_pass = sum(c["passed"] is True for c in self.checks)
        n_fail = sum(c["passed"] is False for c in self.checks)
        n_skip = sum(c["passed"] is None for c in self.checks)
        print(f"{self.name}: {n_pass} passed, {n_fail} failed, {n_skip} skipped -> {path}", flush=True)
        return path

    def guarded(self, what: str, fn: Callable[[], None]) -> None:
        """Run one group of checks; an exception is recorded as a failed check and the script goes on."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the kit must report every failure and keep going
            self.error(what, err)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


# -- measurement ----------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_peak(fn: Callable[[], Any], device: str, profile_cpu_memory: bool = False) -> Tuple[Any, float, Optional[int]]:
    """(result, seconds, peak bytes allocated above what was live before) of one call.

    CUDA: torch's allocator statistics. CPU: torch's allocator events through the profiler when asked (slow),
    else None.
    """
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated() - before
    if not profile_cpu_memory:
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start, None
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    seconds = time.perf_counter() - start
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, seconds, peak


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """||estimate - reference|| / ||reference|| over the whole tensor (float64, on the CPU)."""
    estimate, reference = estimate.detach().double().cpu(), reference.detach().double().cpu()
    norm = float(reference.norm())
    return float((estimate - reference).norm()) / norm if norm > 0 else float((estimate - reference).norm())


def per_row_relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """max over rows (e.g. Gaussians) of ||e_i - r_i|| / ||r_i||, over rows with ||r_i|| > 0."""
    estimate = estimate.detach().double().cpu().reshape(estimate.shape[0], -1)
    reference = reference.detach().double().cpu().reshape(reference.shape[0], -1)
    norms = reference.norm(dim=1)
    seen = norms > 0
    if not seen.any():
        return 0.0
    return float(((estimate - reference).norm(dim=1)[seen] / norms[seen]).max())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (ties broken by index), without scipy."""
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    finite = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[finite], b[finite]
    if a.numel() < 2:
        return float("nan")
    ra = torch.empty_like(a).index_put_((torch.argsort(a, stable=True),), torch.arange(a.numel(), dtype=a.dtype))
    rb = torch.empty_like(b).index_put_((torch.argsort(b, stable=True),), torch.arange(b.numel(), dtype=b.dtype))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# -- scenes ---------------------------------------------------------------------------------------------------------


def frustum_scene(n: int, width: int, height: int, device: str, seed: int = 0, sh_degree: int = 3,
                  dtype: torch.dtype = torch.float32, world_sigma: float = 0.01):
    """n Gaussians filling the frustum of one camera at the origin (looking down +z, fx = width) between depths
    2 and 12, world-space scales around `world_sigma` (a few pixels at full HD), opacities sigmoid(N(0, 1.5)):
    a view with a realistic depth complexity for its Gaussian count. Returns (Gaussians, Views)."""
    from nerfstudio_pruning.types import Gaussians, Views

    g = torch.Generator().manual_seed(seed)
    depth = 2.0 + 10.0 * torch.rand(n, generator=g)
    fx = float(width)
    x = (torch.rand(n, generator=g) - 0.5) * width / fx * depth * 1.1
    y = (torch.rand(n, generator=g) - 0.5) * height / fx * depth * 1.1
    means = torch.stack([x, y, depth], dim=-1)
    log_scales = math.log(world_sigma) + 0.5 * torch.randn(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g)
    opacity_logits = 1.5 * torch.randn(n, generator=g)
    k = (sh_degree + 1) ** 2
    sh = 0.15 * torch.randn(n, k, 3, generator=g)
    sh[:, 0] = (torch.rand(n, 3, generator=g) - 0.5) * 3.0
    gaussians = Gaussians(*(t.to(device=device, dtype=dtype) for t in (means, quats, log_scales, opacity_logits, sh)),
                          sh_degree=sh_degree)
    Ks = torch.tensor([[[fx, 0.0, width / 2], [0.0, fx, height / 2], [0.0, 0.0, 1.0]]], dtype=dtype, device=device)
    views = Views(torch.eye(4, dtype=dtype, device=device)[None], Ks, width, height,
                  torch.tensor([0.1, 0.2, 0.3], dtype=dtype, device=device))
    return gaussians, views


def orbit_scene(n: int, n_views: int, width: int, height: int, device: str, seed: int = 0, sh_degree: int = 2,
                dtype: torch.dtype = torch.float32, opacity_boost: float = 1.0, scale: float = 0.12):
    """The tests' small orbit scene (`nerfstudio_pruning.testing.synthetic`) on `device`, plus two nearly opaque
    Gaussians on pixel centres (the 0.999 alpha clamp). Returns (GaussianSet, Views)."""
    from nerfstudio_pruning.testing.synthetic import orbit_cameras, point_on_pixel_centre, random_gaussians
    from nerfstudio_pruning.types import Views

    g = random_gaussians(n, sh_degree=sh_degree, extent=0.5, scale=scale, seed=seed, dtype=torch.float64)
    g.opacity_logits = g.opacity_logits + opacity_boost
    viewmats, Ks = orbit_cameras(n_views, width, height, radius=2.0)
    viewmats, Ks = viewmats.double(), Ks.double()
    g.opacity_logits[:2] = 12.0
    g.log_scales[:2] = math.log(0.25)
    g.means[0] = point_on_pixel_centre(viewmats[0], Ks[0], width // 3, height // 2, 1.2)
    g.means[1] = point_on_pixel_centre(viewmats[-1], Ks[-1], width // 2, height // 3, 1.3)
    g = type(g)(**{k: v.to(device=device, dtype=dtype) for k, v in g.__dict__.items()})
    background = torch.tensor([0.2, 0.4, 0.6], dtype=dtype, device=device)
    return g, Views(viewmats.to(device=device, dtype=dtype), Ks.to(device=device, dtype=dtype), width, height, background)
