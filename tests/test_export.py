"""`ns-export gaussian-splat` of pruned runs: a PLY with the standard 3DGS layout that renders as the model does.

Viewers read the Inria layout: x y z, nx ny nz, f_dc_0..2, f_rest_0..3((d+1)^2-1)-1 (channel-major), opacity as a
logit, scale_0..2 as logs, rot_0..3 (w x y z). nerfstudio #3377 (a misaligned PLY at SH degree 0) is why every
degree is checked. The pruned pup-gs run is re-expressed at SH degrees 0-2 by dropping its higher coefficients
(at degree 0 splatfacto stores colours as logits instead of SH), and exported the way ns-export does, in process.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nerfstudio.models.splatfacto import SH2RGB, num_sh_bases
from nerfstudio.scripts.exporter import ExportGaussianSplat
from nerfstudio.utils.eval_utils import eval_setup
from plyfile import PlyData

from nerfstudio_pruning.render import rasterization

LOW_OPACITY_LOGIT = -5.5373  # ns-export leaves out Gaussians below logit(1/255), which no rasterizer draws


def run_at_sh_degree(run: Path, degree: int, root: Path) -> Path:
    """A copy of `run` whose model has SH degree `degree`; returns its config.yml."""
    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.pipeline.model.sh_degree = degree
    config.output_dir = root
    config.experiment_name = f"sh{degree}"
    checkpoint = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    params = state["pipeline"]
    params["_model.gauss_params.features_rest"] = params["_model.gauss_params.features_rest"][:, : num_sh_bases(degree) - 1]
    if degree == 0:
        rgb = SH2RGB(params["_model.gauss_params.features_dc"]).clamp(1e-4, 1 - 1e-4)
        params["_model.gauss_params.features_dc"] = torch.logit(rgb)
    target = config.get_checkpoint_dir() / checkpoint.name
    target.parent.mkdir(parents=True)
    torch.save({"step": state["step"], "pipeline": params}, target)
    path = config.get_base_dir() / "config.yml"
    path.write_text(yaml.dump(config))
    return path


def export(config: Path, output_dir: Path) -> PlyData:
    ExportGaussianSplat(load_config=config, output_dir=output_dir).main()
    return PlyData.read(str(output_dir / "splat.ply"))


def expected_names(degree: int):
    rest = 3 * (num_sh_bases(degree) - 1)
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def render_ply(vertex, degree: int, model, camera) -> torch.Tensor:
    """Render the read-back Gaussians as the model renders itself in eval mode (same rasterizer arguments)."""
    column = lambda *names: torch.from_numpy(np.stack([np.asarray(vertex[n], dtype=np.float32) for n in names], axis=-1))
    n = len(vertex["x"])
    rest = 3 * (num_sh_bases(degree) - 1)
    dc = column("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :]
    # f_rest is stored channel-major: all of red's coefficients, then green's, then blue's.
    rest_sh = column(*[f"f_rest_{i}" for i in range(rest)]).reshape(n, 3, -1).transpose(1, 2) if rest else dc[:, :0]
    sh = torch.cat([dc, rest_sh], dim=1)
    camera = camera.to("cpu")
    from nerfstudio.models.splatfacto import get_viewmat

    render, alpha, _ = rasterization(
        means=column("x", "y", "z"), quats=column("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=torch.exp(column("scale_0", "scale_1", "scale_2")), opacities=torch.sigmoid(column("opacity")[:, 0]),
        colors=sh, viewmats=get_viewmat(camera.camera_to_worlds), Ks=camera.get_intrinsics_matrices(),
        width=int(camera.width), height=int(camera.height), tile_size=16, packed=False, near_plane=0.01,
        far_plane=1e10, render_mode="RGB", sh_degree=degree, rasterize_mode=model.config.rasterize_mode,
    )
    background = model.background_color.to(render)
    return torch.clamp(render[0] + (1 - alpha[0]) * background, 0.0, 1.0)


def check_export(config: Path, output_dir: Path, degree: int) -> int:
    ply = export(config, output_dir)
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == expected_names(degree)
    assert all(np.isfinite(vertex[p.name]).all() for p in vertex.properties)

    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    model = pipeline.model
    model.eval()
    with torch.no_grad():
        opacity = model.opacities.squeeze(-1)
        assert vertex.count == int((opacity >= LOW_OPACITY_LOGIT).sum())
        assert vertex.count > 0
        # Opacity is written as a logit and scales as logs (what viewers apply sigmoid and exp to).
        kept = opacity >= LOW_OPACITY_LOGIT
        assert np.allclose(vertex["opacity"], opacity[kept].numpy(), atol=1e-6)
        assert np.allclose(vertex["scale_0"], model.scales[kept, 0].numpy(), atol=1e-6)
        camera = pipeline.datamanager.train_dataset.cameras[0:1]
        expected = model.get_outputs(camera.to(model.device))["rgb"]
        rendered = render_ply(vertex, degree, model, camera)
    difference = float((rendered - expected).abs().max())
    assert difference < 1e-5, f"read-back render differs from the model's by {difference}"
    assert float(expected.std()) > 0.02  # a picture, not a blank: the comparison means something
    return vertex.count


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_pruned_pup_gs_export_reads_back_and_renders_like_the_model(pup_run, tmp_path, degree):
    _, run = pup_run
    config = run / "config.yml" if degree == 3 else run_at_sh_degree(run, degree, tmp_path / "runs")
    count = check_export(config, tmp_path / "export", degree)
    final = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    n_model = torch.load(final, map_location="cpu", weights_only=True)["pipeline"]["_model.gauss_params.means"].shape[0]
    assert count <= n_model


def test_vedal_gs_export_mid_gate_holds_only_what_the_model_renders(vedal_run, tmp_path):
    """Before the hard removal, the Gaussians the mask hides are left out of the file, and the file still renders
    exactly as the model does."""
    from conftest import VEDAL_SAVE_BEFORE_REMOVAL

    _, run = vedal_run
    text = (run / "config.yml").read_text().replace("load_step: null", f"load_step: {VEDAL_SAVE_BEFORE_REMOVAL}")
    config = tmp_path / "config.yml"
    config.write_text(text)
    count = check_export(config, tmp_path / "export", 3)
    state = torch.load(run / "nerfstudio_models" / f"step-{VEDAL_SAVE_BEFORE_REMOVAL:09d}.ckpt", map_location="cpu",
                       weights_only=True)["pipeline"]
    assert count < state["_model.gauss_params.means"].shape[0]
    assert math.isfinite(count)
