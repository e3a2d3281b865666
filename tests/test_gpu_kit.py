"""The GPU kit (benchmarks/gpu) runs where there is no GPU: each script in `--device cpu --quick` mode exercises
its comparisons among the CPU engines and writes its JSON, so a typo does not first show on the GPU machine,
whose time is scarce. Scripts (a)-(d) import no nerfstudio (the GPU machine has none); the methods stage (e) runs
nerfstudio from the kit's carried wheels, and the tests at the end check that this wheel set alone (with a CPU torch
and the kit's shims) imports the plugin, both methods and ns-train (and, with NSP_GPU_KIT_E2E=1, runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
SCRIPTS = {
    "check_rasterizer_parity": "rasterizer_parity",
    "check_scores": "scores",
    "bench_scoring_memory": "scoring_memory",
    "bench_pair_memory": "pair_memory_terms",
    "check_pairs_and_layers": "pairs_and_layers",
}
# The GPU machine has torch, numpy and gsplat (from the carried wheels) and nothing of nerfstudio's stack.
BLOCKED = ("nerfstudio", "numba", "scipy", "torchvision", "tyro", "viser", "nerfacc", "open3d", "jaxtyping")


def run_script(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # Import blocker: a kit module importing any of BLOCKED fails as it would on the GPU machine.
    code = (f"import sys; [sys.modules.__setitem__(m, None) for m in {BLOCKED!r}]; "
            f"sys.argv = [{str(KIT / f'{script}.py')!r}, '--device', 'cpu', '--quick', '--out', {str(out)!r}, *{extra!r}]; "
            f"sys.path.insert(0, {str(KIT)!r}); import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NSP_CPU_RASTERIZER", None)  # as on the GPU machine: chosen by the kit (torch, numba being absent)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=KIT.parents[1])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_kit_script_runs_on_cpu_without_nerfstudio_or_numba(script, tmp_path):
    extra = ("--sizes", "2k@64x36") if script == "bench_scoring_memory" else ()
    result = run_script(script, tmp_path, *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    data = json.loads((tmp_path / f"{SCRIPTS[script]}.json").read_text())
    assert data["environment"]["cpu_rasterizer"] == "torch"
    assert data["environment"]["gsplat"] == "1.4.0"
    passed = [c for c in data["checks"] if c["passed"] is True]
    failed = [c for c in data["checks"] if c["passed"] is False]
    assert passed and not failed, failed


def test_summary_collects_every_result(tmp_path):
    for script in ("check_rasterizer_parity", "check_scores"):
        assert run_script(script, tmp_path).returncode == 0
    result = subprocess.run([sys.executable, str(KIT / "summarize.py"), str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "## rasterizer_parity" in summary and "## scores" in summary and "| pass |" in summary
    assert "| FAIL |" not in summary


def test_run_all_and_fetch_wheels_are_valid_bash():
    for script in ("run_all.sh", "fetch_wheels.sh"):
        result = subprocess.run(["bash", "-n", str(KIT / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_kits_single_pass_gsplat_list_is_brute_force(monkeypatch):
    """check_pairs_and_layers.single_pass_gsplat_pairs (CUDA only) with gsplat's kernels replaced by the tests'
    stand-in: on CPU it must give the pairs of the exact rules."""
    import gsplat.cuda._wrapper as wrapper

    from test_bounded_pairs import EmulatedGsplatKernels, brute_force_pairs, projected_scene

    monkeypatch.syspath_prepend(str(KIT))
    import check_pairs_and_layers

    for name in ("isect_tiles", "isect_offset_encode", "rasterize_to_indices_in_range"):
        monkeypatch.setattr(wrapper, name, getattr(EmulatedGsplatKernels, name))
    proj = projected_scene(200, 40, 30, 2, seed=8, packed=False)
    single = check_pairs_and_layers.single_pass_gsplat_pairs(proj, 2, 40, 30)
    expected = brute_force_pairs(proj, 2, 40, 30, 16)
    single_keys = check_pairs_and_layers.pair_keys(single, "cpu")
    expected_keys = check_pairs_and_layers.pair_keys(expected, "cpu")
    assert check_pairs_and_layers.differing_fraction(single_keys, expected_keys) == 0
    assert len(single) == len(expected) > 1000
    # The comparison the kit reports counts a pair missing on either side.
    assert check_pairs_and_layers.differing_fraction(single_keys[1:], expected_keys) == 1 / len(expected)
    assert check_pairs_and_layers.differing_fraction(single_keys, expected_keys[1:]) == 1 / (len(expected) - 1)


# -- the methods stage's wheel set: nerfstudio and the plugin from the carried wheels alone -------------------------
#
# The GPU machine has Python 3.12, torch and nothing else; the kit carries nerfstudio (--no-deps) and a minimal set
# of wheels (fetch_wheels.sh) and stands in for the rest with benchmarks/gpu/shims. Here the same versions for this
# machine's python (cp311, fetched into benchmarks/gpu/cache/wheels-cp311 when absent; skipped when offline) are
# installed with `pip install --no-index --no-deps --target` into a venv that sees only them and this interpreter's
# CPU torch (symlinked with its own dependencies, as torch brings them on the GPU machine). The venv and its
# installed wheels are kept in benchmarks/gpu/cache/test-env-pyX.Y (rebuilt when the wheel set changes).
# Measured here (2 cores, shared): wheels download ~10 s (once), venv + install 6-8 s (once, then cached), imports
# ~5 s; the CPU run of the methods stage (NSP_GPU_KIT_E2E=1) ~80 s.

import hashlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

PYTAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
LOCAL_WHEELS = KIT / "cache" / f"wheels-{PYTAG}"
TEST_ENV = KIT / "cache" / f"test-env-py{sys.version_info[0]}.{sys.version_info[1]}"
# torch and what `pip install torch` brings with it (the GPU machine's torch has them too; setuptools is needed by
# torch.compile's CPU backend, which nerfstudio uses).
TORCH_DISTS = ("torch", "setuptools", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
               "typing_extensions")
RUN_E2E = os.environ.get("NSP_GPU_KIT_E2E") == "1"


def kit_packages() -> list:
    """The `name==version` pins of fetch_wheels.sh's default set (not --with-numba)."""
    text = (KIT / "fetch_wheels.sh").read_text()
    block = text.split("PACKAGES=(", 1)[1].split("\n)", 1)[0]
    block = "\n".join(line.split("#", 1)[0] for line in block.splitlines())
    return re.findall(r'"([A-Za-z0-9_.\-]+==[^"]+)"', block)


def _wheel_for(pin: str, wheels: list):
    name, version = pin.split("==")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    return next((w for w in wheels if w.name.lower().startswith(prefix)), None)


def local_wheels() -> list:
    pins = kit_packages()
    wheels = sorted(LOCAL_WHEELS.glob("*.whl"))
    if any(_wheel_for(pin, wheels) is None for pin in pins):
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        proc = subprocess.run(["bash", str(KIT / "fetch_wheels.sh"), "--python", version], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PIP": f"{sys.executable} -m pip"})
        wheels = sorted(LOCAL_WHEELS.glob("*.whl"))
        missing = [pin for pin in pins if _wheel_for(pin, wheels) is None]
        if missing:
            pytest.skip(f"the kit's wheels for {PYTAG} could not be fetched (offline?): missing {missing}; "
                        f"pip said: {(proc.stdout + proc.stderr)[-600:]}")
    return [_wheel_for(pin, wheels) for pin in pins]


def _dist_paths(name: str) -> list:
    """The files of an installed distribution at top level of its site-packages (packages, modules, dist-info)."""
    from importlib.metadata import distribution

    dist = distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    root = Path(dist.locate_file(""))
    return [root / top for top in tops if (root / top).exists() and top not in ("bin", "__pycache__")]


def clean_env(wheels: list):
    """(python, site): a venv with no packages, this interpreter's torch on a .pth, the kit's wheels in `site`."""
    stamp = hashlib.sha256("\n".join([sys.version, *TORCH_DISTS, *(w.name for w in wheels)]).encode()).hexdigest()[:16]
    python, site, stamp_file = TEST_ENV / "venv" / "bin" / "python", TEST_ENV / "site", TEST_ENV / "stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp and python.exists():
        return python, site
    shutil.rmtree(TEST_ENV, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(TEST_ENV / "venv")], check=True, timeout=120)
    torch_dir = TEST_ENV / "torch"
    torch_dir.mkdir()
    for name in TORCH_DISTS:
        for path in _dist_paths(name):
            (torch_dir / path.name).symlink_to(path)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "kit_test_torch.pth").write_text(f"{torch_dir}\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "--target", str(site), *map(str, wheels)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamp_file.write_text(stamp)
    print(f"clean env built in {time.perf_counter() - start:.1f} s")
    return python, site


def kit_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NERFSTUDIO_", "PYTHON"))}
    return {**env, "PYTHONPATH": f"{site}{os.pathsep}{KIT.parents[1]}", "OMP_NUM_THREADS": "1"}


def test_kit_wheels_install_with_no_deps_and_import_nerfstudio_and_both_methods():
    """ns_kit.py imports: the plugin, pup-gs's and vedal-gs's modules and model configs (registered with nerfstudio
    from pyproject.toml, as ns-train sees them), the trainer, and nerfstudio.scripts.train/eval/exporter, with
    nothing but the carried wheels, torch and the shims."""
    python, site = clean_env(local_wheels())
    start = time.perf_counter()
    proc = subprocess.run([str(python), str(KIT / "ns_kit.py"), "imports"], capture_output=True, text=True,
                          timeout=300, env=kit_env(site), cwd=KIT.parents[1])
    out = proc.stdout + proc.stderr
    print(f"imports took {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0 and "[FAIL]" not in out, out[-5000:]
    assert f"nerfstudio 1.1.5 from {site / 'nerfstudio'}" in out, out[-2000:]
    for line in ("import nerfstudio.scripts.train", "method config pup-gs: PupGSModelConfig",
                 "method config vedal-gs: VedalGSModelConfig", "dataparser nsp-default-scene"):
        assert f"[PASS] {line}" in out, out[-3000:]
    # The shims stand in only inside the launcher: the clean env's python alone has no cv2 or open3d.
    bare = subprocess.run([str(python), "-c", "import cv2"], capture_output=True, text=True, env=kit_env(site))
    assert bare.returncode != 0 and "No module named 'cv2'" in bare.stderr


@pytest.mark.skipif(not RUN_E2E, reason="about 90 s on 2 cores: set NSP_GPU_KIT_E2E=1 to run it")
def test_methods_stage_quick_on_cpu_in_the_clean_env(tmp_path):
    """run_methods.py --quick --device cpu (what `run_all.sh quick` runs on the GPU machine, there on CUDA): ns-train
    splatfacto-portable, pup-gs (post hoc) and vedal-gs for a few steps, ns-eval and ns-export gaussian-splat."""
    python, site = clean_env(local_wheels())
    proc = subprocess.run([str(python), str(KIT / "run_methods.py"), "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**kit_env(site), "STAGE_TIMEOUT": "880"}, cwd=KIT.parents[1])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    data = json.loads((tmp_path / "methods.json").read_text())
    assert not [c for c in data["checks"] if c["passed"] is not True], data["checks"]
    rows = {row["method"]: row for row in data["measurements"]}
    assert set(rows) == {"pup-gs", "vedal-gs"} and all(row["ply_vertices"] > 0 for row in rows.values())


# -- the evidence and install stages ----------------------------------------------------------------------------------
#
# `run_all.sh evidence` trains through ns-prune-compare on carried copies of ../shared/data's captures and `install`
# installs the plugin's wheel and checks that torch is untouched. The fast tests check their pieces; the dry run
# (NSP_GPU_KIT_E2E=1) runs both stages as the GPU machine would, on CPU, on tiny copies of bonsai at a 1/500
# schedule: every ns-train variant of the real plan, the tables, --no-train, --merge and summarize.py.

SHARED_DATA = Path("/work/shared/data")


def _kit_module(name: str):
    import importlib

    if str(KIT) not in sys.path:
        sys.path.insert(0, str(KIT))
    return importlib.import_module(name)


@pytest.mark.parametrize("text", [True, False])
def test_open3d_shim_reads_seed_points_as_nerfstudio_keeps_them(tmp_path, text):
    """nerfstudio-data reads a capture's sparse_pc.ply with open3d, which the GPU image lacks: the shim's
    read_point_cloud must give what nerfstudio keeps of open3d's result (float32 points, uint8 colours)."""
    import importlib.util

    import numpy as np

    rng = np.random.default_rng(3)
    xyz = (rng.normal(size=(500, 3)) * 7).astype(np.float32)
    rgb = rng.integers(0, 256, size=(500, 3)).astype(np.uint8)
    path = tmp_path / "points.ply"
    _kit_module("prepare_evidence_data").write_points(path, xyz, rgb, text)
    sys.path.insert(0, str(KIT / "shims"))
    try:
        spec = importlib.util.spec_from_file_location("kit_open3d_io", KIT / "shims" / "open3d" / "io.py")
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
    finally:
        sys.path.remove(str(KIT / "shims"))
    pcd = shim.read_point_cloud(str(path))
    assert np.array_equal(np.asarray(pcd.points, dtype=np.float32), xyz)
    assert np.array_equal((np.asarray(pcd.colors) * 255).astype(np.uint8), rgb)
    try:
        import open3d
    except ImportError:
        return
    real = open3d.io.read_point_cloud(str(path))
    assert np.array_equal(np.asarray(real.points, dtype=np.float32), np.asarray(pcd.points, dtype=np.float32))
    assert np.array_equal((np.asarray(real.colors) * 255).astype(np.uint8), (pcd.colors * 255).astype(np.uint8))
    with pytest.raises(RuntimeError, match="PLY files only"):
        shim.read_point_cloud(str(tmp_path / "points.pcd"))


def test_evidence_plan_fits_the_budget_and_maps_finished_runs(tmp_path):
    """The schedule chosen is the largest of the ladder whose estimate fits; a folder of finished runs maps to
    ns-prune-compare's --runs keys (a run without a checkpoint is left out)."""
    evidence = _kit_module("run_evidence")
    rates = evidence.RATES["cuda"]
    full = evidence.part_work("pup", 1.0, 263)
    assert full.steps == 30000 + 10000 + 2 * 10000 and full.scored_views == 4 * 263 and full.eval_rows == 4
    vedal = evidence.part_work("vedal", 1.0, 263)
    assert vedal.steps == 60000 and vedal.scored_views == 8 * (23000 // 100)
    budget = evidence.part_work("vedal", 0.25, 263).seconds(rates) + 1
    chosen = next(s for s in evidence.LADDER if evidence.part_work("vedal", s, 263).seconds(rates) <= budget)
    assert chosen == 0.25
    for method, run, ckpt in (("splatfacto-portable", "splatfacto-40k-s42", True),
                              ("splatfacto-portable", "splatfacto-densify-7k-s42", True),
                              ("pup-gs", "pup-gs-lightgaussian-s42", True), ("pup-gs", "pup-gs-s42", False),
                              ("vedal-gs", "vedal-gs-s42", True)):
        folder = tmp_path / "runs" / "evidence-pup" / method / run
        (folder / "nerfstudio_models").mkdir(parents=True)
        (folder / "config.yml").write_text("x")
        if ckpt:
            (folder / "nerfstudio_models" / "step-000000059.ckpt").write_bytes(b"")
    assert set(evidence.finished_runs(tmp_path)) == {"splatfacto-portable", "splatfacto-densify",
                                                     "pup-gs-lightgaussian", "vedal-gs"}
    args = evidence.compare_args("pup", tmp_path, 0.5, tmp_path / "o", "cuda")
    assert args[args.index("--pup-scores") + 1:args.index("--pup-scores") + 3] == ["fisher", "lightgaussian"]


@pytest.mark.slow
@pytest.mark.skipif(not RUN_E2E, reason="minutes on 2 shared cores: set NSP_GPU_KIT_E2E=1 to run it")
def test_install_and_evidence_stages_dry_run_on_cpu(tmp_path):
    """`run_all.sh install evidence` with KIT_DEVICE=cpu on tiny copies of bonsai (16 views at 50x33, 2,000 seed
    points) at a 1/500 schedule: the plugin's wheel installs and keeps torch, `ns-train pup-gs --help` works, both
    parts train every run of the real plan through ns-prune-compare, and summary.md holds their tables."""
    if not (SHARED_DATA / "bonsai" / "transforms.json").is_file():
        pytest.skip("no ../shared/data/bonsai here")
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(wheel_dir), str(KIT.parents[1])], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    data = tmp_path / "data"
    prep = subprocess.run([sys.executable, str(KIT / "prepare_evidence_data.py"), "--tiny", str(data), "--scenes",
                           "bonsai"], capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    results, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("NERFSTUDIO_", "PYTHONPATH"))},
           "PYTHON": sys.executable, "KIT_DEVICE": "cpu", "KIT_WHEELS": str(wheel_dir), "KIT_RESULTS": str(results),
           "EVIDENCE_DATA": str(data), "EVIDENCE_SCALE": "0.002", "STAGE_TIMEOUT": "1500", "OUT": str(out),
           "OMP_NUM_THREADS": "1", "NSP_CPU_RASTERIZER": "torch"}
    proc = subprocess.run(["bash", str(KIT / "run_all.sh"), "install", "evidence"], capture_output=True, text=True,
                          timeout=1800, env=env, cwd=KIT.parents[1])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    install = json.loads((results / "install.json").read_text())
    assert [c["check"] for c in install["checks"] if c["passed"] is not True] == [], install["checks"]
    evidence = json.loads((results / "evidence_bonsai.json").read_text())
    assert [c for c in evidence["checks"] if c["passed"] is not True] == []
    rows = {m["row"] for m in evidence["measurements"]}
    assert rows == {"splatfacto (30k)", "splatfacto (40k)", "pup-gs", "pup-gs-lightgaussian",
                    "splatfacto (densify to 7k)", "vedal-gs"}
    merged = json.loads((results / "evidence" / "bonsai-merged" / "results.json").read_text())
    assert len(merged["runs"]) == 6 and merged["schedule_scale"] == 0.002
    summary = (results / "summary.md").read_text()
    assert "# Evidence: ns-prune-compare on real captures" in summary and "| pup-gs-lightgaussian |" in summary
    assert (out / "gpu_kit.tgz").is_file() and (out / "summary.md").is_file()
