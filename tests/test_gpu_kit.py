"""The GPU kit (benchmarks/gpu) runs where there is no GPU: each script in `--device cpu --quick` mode exercises
its comparisons among the CPU engines and writes its JSON, so a typo does not first show on the GPU machine,
whose time is scarce. The kit imports no nerfstudio (the GPU machine has none)."""

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
    assert check_pairs_and_layers.pair_set(single) == check_pairs_and_layers.pair_set(expected)
    assert len(single) == len(expected) > 1000
