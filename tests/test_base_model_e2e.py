"""The base model through the real commands: ns-train on CPU, then ns-eval, ns-export and ns-viewer."""

from __future__ import annotations

import copy
import math
import socket
import subprocess
import time

import pytest
import torch
from plyfile import PlyData

from e2e import BIN, SHARED_DATA, ns, ns_eval, quick_train_args, run_dir
from nerfstudio_pruning.data.cached_dataparser import CachedNerfstudioDataParserConfig
from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig
from nerfstudio_pruning.methods.registry import splatfacto_portable

from conftest import BASE_STEPS


@pytest.fixture(scope="module")
def default_scene_run(e2e_root, default_scene, splatfacto_run):
    return e2e_root, default_scene, splatfacto_run


def _initial_eval_psnr(dataparser, model_overrides=None) -> float:
    """PSNR of the model as built from the seed points, before any step, on the same eval views."""
    pipeline_config = copy.deepcopy(splatfacto_portable.config.pipeline)
    pipeline_config.datamanager.dataparser = dataparser
    for key, value in (model_overrides or {}).items():
        setattr(pipeline_config.model, key, value)
    torch.manual_seed(42)
    pipeline = pipeline_config.setup(device="cpu", test_mode="val")
    pipeline.eval()
    return float(pipeline.get_average_eval_image_metrics()["psnr"])


def test_training_raises_eval_psnr_and_eval_reads_checkpoint(default_scene_run):
    root, scene, run = default_scene_run
    before = _initial_eval_psnr(DefaultSceneDataParserConfig(data=scene))
    after = ns_eval(run / "config.yml", cwd=root)
    assert math.isfinite(after["psnr"]) and after["psnr"] > before + 1.0, (before, after["psnr"])
    assert after["num_gaussians"] > 0
    assert "lpips" not in after or math.isfinite(after["lpips"])  # omitted, never NaN, when weights are missing


def test_checkpoint_loads_with_weights_only(default_scene_run):
    _, _, run = default_scene_run
    ckpt = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == BASE_STEPS - 1


def test_export_gaussian_splat(default_scene_run):
    root, _, run = default_scene_run
    ns("ns-export", ["gaussian-splat", "--load-config", str(run / "config.yml"), "--output-dir", str(root / "export")], cwd=root)
    ply = PlyData.read(str(root / "export" / "splat.ply"))
    v = ply["vertex"]
    names = {p.name for p in v.properties}
    assert {"x", "y", "z", "opacity", "scale_0", "rot_0", "f_dc_0", "f_rest_0"} <= names
    assert v.count > 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_viewer_starts_loads_and_stops(default_scene_run):
    root, _, run = default_scene_run
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "ns-viewer"), "--load-config", str(run / "config.yml"), "--viewer.websocket-port", str(port)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 180
        served = False
        while time.time() < deadline and proc.poll() is None and not served:
            time.sleep(1.0)
            with socket.socket() as s:
                served = s.connect_ex(("127.0.0.1", port)) == 0
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert served, "viewer never opened its port"
    finally:
        proc.terminate()
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert "Done loading checkpoint" in output


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "buddha_color13").is_dir(), reason="../shared/data not present")
def test_trains_on_real_capture_at_low_resolution(tmp_path):
    outputs = tmp_path / "outputs"
    data, cache = SHARED_DATA / "buddha_color13", tmp_path / "cache"
    before = _initial_eval_psnr(
        CachedNerfstudioDataParserConfig(data=data, downscale_factor=8, cache_dir=cache), {"num_downscales": 0}
    )
    ns("ns-train", ["splatfacto-portable", *quick_train_args("buddha", 100, outputs),
                    "--pipeline.model.num-downscales", "0",
                    "nerfstudio-data-cached", "--data", str(data), "--downscale-factor", "8",
                    "--cache-dir", str(cache)], cwd=tmp_path)
    results = ns_eval(run_dir(outputs, "buddha", "splatfacto-portable") / "config.yml", cwd=tmp_path)
    assert math.isfinite(results["psnr"]) and results["psnr"] > before + 1.0, (before, results["psnr"])
