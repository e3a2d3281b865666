"""Pruning a PLY trained elsewhere: `--pipeline.model.init-ply` reads a 3DGS PLY in Inria's layout (the layout of
`ns-export gaussian-splat`), starts pup-gs's rounds or vedal-gs's fine-tuning from it, and the pruned model exports
in the same layout. The PLYs here are written with plyfile directly, not with the package's writer, so that the
reader is checked against the layout rather than against itself.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from e2e import ns, quick_train_args, run_dir
from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.gaussians_ply import in_frame, property_names, read_gaussians_ply, write_gaussians_ply
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.types import Gaussians


# -- the layout, written independently -------------------------------------------------------------------------------
def inria_ply(path: Path, g: Gaussians, drop=(), nan=None, extra_normals=True, order=None) -> Path:
    """Write `g` as Inria's trainer does: x y z nx ny nz f_dc_0..2 f_rest_* (all of red's coefficients, then
    green's, then blue's) opacity scale_0..2 rot_0..3. `drop`: properties left out; `nan`: (property, row) set to
    NaN; `order`: a permutation of the property order (readers must go by name)."""
    n, k = len(g), (g.sh_degree + 1) ** 2
    values = {"x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2]}
    if extra_normals:
        values.update(nx=torch.zeros(n), ny=torch.zeros(n), nz=torch.zeros(n))
    for c in range(3):
        values[f"f_dc_{c}"] = g.sh[:, 0, c]
    for c in range(3):
        for j in range(k - 1):
            values[f"f_rest_{c * (k - 1) + j}"] = g.sh[:, 1 + j, c]
    values["opacity"] = g.opacity_logits
    for i in range(3):
        values[f"scale_{i}"] = g.log_scales[:, i]
    for i in range(4):
        values[f"rot_{i}"] = g.quats[:, i]
    names = [name for name in values if name not in drop]
    if order is not None:
        names = [names[i] for i in order(len(names))]
    records = np.empty(n, dtype=[(name, "<f4") for name in names])
    for name in names:
        records[name] = values[name].detach().float().numpy()
    if nan is not None:
        records[nan[0]][nan[1]] = np.nan
    PlyData([PlyElement.describe(records, "vertex")]).write(str(path))
    return path


def random_gaussians(n: int, degree: int, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(n, 3, generator=gen) * 0.3, quats=torch.randn(n, 4, generator=gen),
        log_scales=torch.rand(n, 3, generator=gen) * 2 - 4.5, opacity_logits=torch.randn(n, generator=gen) + 1,
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=gen) * 0.5, sh_degree=degree)


def assert_same_gaussians(a: Gaussians, b: Gaussians) -> None:
    assert a.sh_degree == b.sh_degree and len(a) == len(b)
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(a, name).float(), getattr(b, name).float()), name


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_reader_follows_inria_s_layout_and_the_writer_writes_it(tmp_path, degree):
    g = random_gaussians(50, degree)
    written = inria_ply(tmp_path / "a.ply", g, order=lambda m: list(reversed(range(m))))
    assert_same_gaussians(read_gaussians_ply(written, sh_degree=degree), g)
    ours = write_gaussians_ply(tmp_path / "b.ply", g)
    vertex = PlyData.read(str(ours))["vertex"]
    # ns-export's order (tests/test_export.py checks nerfstudio writes exactly these names)
    assert [p.name for p in vertex.properties] == property_names(degree)
    assert_same_gaussians(read_gaussians_ply(ours), g)


BAD_PLYS = {
    "missing property": (dict(drop=("scale_1",)), "lacks 1 property of the 3DGS layout: scale_1"),
    "missing f_rest": (dict(drop=("f_rest_7",)), "f_rest_* properties, which fits no SH degree"),
    "NaN": (dict(nan=("rot_2", 3)), "NaN or infinite values in 1 of its 20 Gaussians: rot_2 (1)"),
    "other SH degree": (dict(degree=1), "holds SH degree 1 (9 f_rest_* properties), this config has sh_degree 3: "
                                        "pass --pipeline.model.sh-degree 1"),
    "empty": (dict(n=0), "holds no Gaussians"),
}


def bad_ply(path: Path, case: str) -> Path:
    options, _ = BAD_PLYS[case]
    options = dict(options)
    g = random_gaussians(options.pop("n", 20), options.pop("degree", 3))
    return inria_ply(path, g, **options)


@pytest.mark.parametrize("case", sorted(BAD_PLYS))
def test_bad_plys_are_refused_in_one_line(tmp_path, case):
    with pytest.raises(InputError) as refused:
        read_gaussians_ply(bad_ply(tmp_path / "bad.ply", case), sh_degree=3)
    message = str(refused.value)
    assert "\n" not in message
    assert BAD_PLYS[case][1] in message


def render(g: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int = 48, height: int = 40) -> torch.Tensor:
    image, _, _ = rasterization(means=g.means, quats=g.quats, scales=g.scales, opacities=g.opacities, colors=g.sh,
                                viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=g.sh_degree)
    return image


def random_rotation(gen: torch.Generator, proper: bool) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("proper", [True, False])
def test_a_frame_change_moves_positions_orientations_and_view_dependent_colour(single_thread, proper):
    """Gaussians and cameras moved by the same x -> s (R x + t) render the same image: what a PLY in COLMAP's frame
    needs to line up with nerfstudio's dataparser frame. A reflection (det R = -1) too."""
    gen = torch.Generator().manual_seed(1)
    g = random_gaussians(300, 3, seed=2).with_tensors(sh=random_gaussians(300, 3, seed=3).sh * 2)
    rotation, translation, scale = random_rotation(gen, proper), torch.randn(3, generator=gen, dtype=torch.float64), 0.37
    cam_rotation = random_rotation(gen, True)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = cam_rotation
    c2w[:3, 3] = -cam_rotation @ torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64)  # the origin 2.5 ahead
    similarity = torch.eye(4, dtype=torch.float64)
    similarity[:3, :3], similarity[:3, 3] = scale * rotation, scale * translation
    moved_c2w = similarity @ c2w
    moved_c2w[:3, :3] /= scale  # cameras keep unit axes; the scale moves only where they are
    Ks = torch.tensor([[[40.0, 0, 24], [0, 40.0, 20], [0, 0, 1]]])
    transform = torch.cat([rotation, translation[:, None]], dim=1)
    before = render(g, torch.linalg.inv(c2w).float()[None], Ks)
    after = render(in_frame(g, transform, scale), torch.linalg.inv(moved_c2w).float()[None], Ks)
    assert float(before.std()) > 0.05
    assert float((before - after).abs().max()) < 2e-4
    # without rotating the SH coefficients the view-dependent colour would differ
    unrotated = in_frame(g, transform, scale).with_tensors(sh=g.sh)
    assert float((render(unrotated, torch.linalg.inv(moved_c2w).float()[None], Ks) - before).abs().max()) > 0.05


# -- through nerfstudio ------------------------------------------------------------------------------------------------
def checkpoint_gaussians(run: Path) -> Gaussians:
    checkpoint = sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["pipeline"]
    p = {name: state[f"_model.gauss_params.{name}"] for name in
         ("means", "quats", "scales", "opacities", "features_dc", "features_rest")}
    return Gaussians(means=p["means"], quats=p["quats"], log_scales=p["scales"], opacity_logits=p["opacities"][:, 0],
                     sh=torch.cat([p["features_dc"][:, None], p["features_rest"]], dim=1), sh_degree=3)


@pytest.fixture(scope="module")
def trained_ply(splatfacto_run, tmp_path_factory):
    """A splatfacto-portable run's Gaussians as an Inria PLY (in nerfstudio's frame, as ns-export writes them)."""
    g = checkpoint_gaussians(splatfacto_run)
    return g, inria_ply(tmp_path_factory.mktemp("ply") / "trained.ply", g)


def trainer_config(method: str, scene: Path, output_dir: Path, ply: Path, **model_fields):
    from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig
    from nerfstudio_pruning.methods import registry

    spec = {"pup-gs": registry.pup_gs, "vedal-gs": registry.vedal_gs}[method]
    config = copy.deepcopy(spec.config)
    config.pipeline.datamanager.dataparser = DefaultSceneDataParserConfig(data=scene)
    config.output_dir, config.vis, config.experiment_name = output_dir, "tensorboard", "ply"
    config.pipeline.model.init_ply = ply
    for name, value in model_fields.items():
        setattr(config.pipeline.model, name, value)
    config.set_timestamp()
    return config


def test_pup_gs_starts_from_the_ply_at_its_rounds_and_renders_as_the_source_model(trained_ply, default_scene,
                                                                                   tmp_path, single_thread):
    source, ply = trained_ply
    config = trainer_config("pup-gs", default_scene, tmp_path / "out", ply)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    assert trainer._start_step == config.pipeline.model.schedule.prune_start_step
    assert_same_gaussians(model.gaussians(sh_degree=3), source)
    # learning rates as after prune_start_step steps of splatfacto's schedule (means: exponential decay)
    means = config.optimizers["means"]
    t = min(trainer._start_step / means["scheduler"].max_steps, 1.0)
    expected_lr = means["optimizer"].lr * (means["scheduler"].lr_final / means["optimizer"].lr) ** t
    assert math.isclose(trainer.optimizers.optimizers["means"].param_groups[0]["lr"], expected_lr, rel_tol=1e-6)

    camera = trainer.pipeline.datamanager.train_dataset.cameras[0:1]
    from nerfstudio.models.splatfacto import get_viewmat

    viewmats, Ks = get_viewmat(camera.camera_to_worlds), camera.get_intrinsics_matrices()
    width, height = int(camera.width), int(camera.height)
    expected = render(source, viewmats, Ks, width, height)
    model.eval()
    model.step = trainer._start_step  # what the first training step's callback sets
    with torch.no_grad():
        outputs = model.get_outputs(camera.to(model.device))
    background = model.background_color.to(expected)
    _, alpha, _ = rasterization(means=source.means, quats=source.quats, scales=source.scales,
                                opacities=source.opacities, colors=source.sh, viewmats=viewmats, Ks=Ks, width=width,
                                height=height, sh_degree=3)
    expected = torch.clamp(expected[0] + (1 - alpha[0]) * background, 0, 1)
    assert float(expected.std()) > 0.02
    assert float((outputs["rgb"] - expected).abs().max()) < 1e-5


def setup_refused(config, capsys) -> str:
    trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(SystemExit) as exited:
        trainer.setup()
    assert exited.value.code == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_ply_in_colmap_s_frame_is_placed_by_the_dataparser_transform(trained_ply, default_scene, tmp_path,
                                                                        single_thread, capsys):
    """The built-in scene's dataparser scales its poses (by 1/max |camera position|), as nerfstudio-data does: a
    PLY trained on the unscaled poses (Inria's trainer on COLMAP's) lines up only mapped by that scale; each PLY
    given with the other frame is refused, naming the frame that fits."""
    from nerfstudio_pruning.gaussians_ply import inverse_frame

    source, dataset_ply = trained_ply
    config = trainer_config("pup-gs", default_scene, tmp_path / "out", Path("unused"))
    outputs = config.pipeline.datamanager.dataparser.setup().get_dataparser_outputs("train")
    scale = float(outputs.dataparser_scale)
    assert abs(math.log(scale)) > math.log(2)  # the two frames differ
    colmap_ply = inria_ply(tmp_path / "colmap.ply", in_frame(source, *inverse_frame(outputs.dataparser_transform, scale)))

    config = trainer_config("pup-gs", default_scene, tmp_path / "out", colmap_ply, init_ply_frame="colmap")
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    placed = trainer.pipeline.model.gaussians(sh_degree=3)
    assert torch.allclose(placed.means, source.means, atol=1e-5)
    assert torch.allclose(placed.log_scales, source.log_scales, atol=1e-5)

    line = setup_refused(trainer_config("pup-gs", default_scene, tmp_path / "out", colmap_ply), capsys)
    assert line.endswith("pass --pipeline.model.init-ply-frame colmap"), line
    line = setup_refused(trainer_config("pup-gs", default_scene, tmp_path / "out", dataset_ply,
                                        init_ply_frame="colmap"), capsys)
    assert line.endswith("pass --pipeline.model.init-ply-frame dataset"), line


def test_a_degree_0_ply_loads_into_a_degree_0_model(trained_ply, default_scene, tmp_path, single_thread):
    """At SH degree 0 splatfacto keeps colours as logits, the PLY as a DC coefficient (upstream #3377 was a
    misaligned degree-0 export): the model holds the PLY's colours."""
    source, _ = trained_ply
    c0 = 0.28209479177387814
    dc = ((source.sh[:, :1] * c0 + 0.5).clamp(0.02, 0.98) - 0.5) / c0
    flat = source.with_tensors(sh=dc, sh_degree=0)
    ply = inria_ply(tmp_path / "sh0.ply", flat)
    assert read_gaussians_ply(ply).sh_degree == 0
    config = trainer_config("pup-gs", default_scene, tmp_path / "out", ply, sh_degree=0)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    assert torch.allclose(model.colors, (dc[:, 0] * c0 + 0.5), atol=1e-5)
    assert torch.allclose(model.gaussians().sh, dc, atol=1e-4)


@pytest.mark.parametrize("case", ["missing property", "NaN", "other SH degree", "empty"])
def test_ns_train_refuses_a_bad_ply_before_writing_anything(default_scene, tmp_path, capsys, case):
    from nerfstudio.scripts.train import main

    config = trainer_config("pup-gs", default_scene, tmp_path / "out", bad_ply(tmp_path / "bad.ply", case))
    with pytest.raises(SystemExit) as exited:
        main(config)
    assert exited.value.code == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and BAD_PLYS[case][1] in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_ply_and_checkpoint_together_are_refused(trained_ply, splatfacto_run, default_scene, tmp_path, capsys):
    from nerfstudio.scripts.train import main

    config = trainer_config("pup-gs", default_scene, tmp_path / "out", trained_ply[1])
    config.load_dir = splatfacto_run / "nerfstudio_models"
    with pytest.raises(SystemExit):
        main(config)
    assert "pass one of them" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_pup_gs_prunes_a_ply_post_hoc_and_exports_it_in_the_same_layout(trained_ply, default_scene, tmp_path):
    source, ply = trained_ply
    outputs = tmp_path / "outputs"
    proc = ns("ns-train", ["pup-gs", *quick_train_args("ply", 10, outputs), "--pipeline.model.init-ply", str(ply),
                           "--pipeline.model.refine-steps", "5", "5", "nsp-default-scene", "--data",
                           str(default_scene)], cwd=tmp_path)
    assert "this run trains steps 30000 to 30009" in proc.stdout.replace("\n", " ")
    run = run_dir(outputs, "ply", "pup-gs")
    rounds = json.loads((run / "pruning.json").read_text())["rounds"]
    assert [r["step"] for r in rounds] == [30000, 30005]
    assert rounds[0]["gaussians_before"] == len(source)
    assert rounds[-1]["gaussians_after"] == len(source) - round(0.8 * len(source)) - round(
        0.5 * (len(source) - round(0.8 * len(source))))

    from nerfstudio.scripts.exporter import ExportGaussianSplat

    ExportGaussianSplat(load_config=run / "config.yml", output_dir=tmp_path / "export").main()
    exported = read_gaussians_ply(tmp_path / "export" / "splat.ply", sh_degree=3)
    pruned = checkpoint_gaussians(run)
    kept = pruned.opacity_logits >= -5.5373  # ns-export leaves out what no rasterizer draws
    assert 0 < len(exported) == int(kept.sum())
    assert_same_gaussians(exported, pruned.subset(kept))


def test_pup_gs_reaches_a_target_fraction_and_reports_the_size_asked(trained_ply, default_scene, tmp_path):
    source, ply = trained_ply
    outputs = tmp_path / "outputs"
    ns("ns-train", ["pup-gs", *quick_train_args("target", 10, outputs), "--pipeline.model.init-ply", str(ply),
                    "--pipeline.model.refine-steps", "5", "5", "--pipeline.model.target-fraction", "0.3",
                    "nsp-default-scene", "--data", str(default_scene)], cwd=tmp_path)
    report = json.loads((run_dir(outputs, "target", "pup-gs") / "pruning.json").read_text())
    asked = round(0.3 * len(source))
    assert report["target_gaussians"] == asked == report["final_gaussians"] == report["rounds"][-1]["gaussians_after"]


def test_vedal_gs_fine_tunes_a_ply_without_densifying(trained_ply, default_scene, tmp_path):
    source, ply = trained_ply
    outputs = tmp_path / "outputs"
    proc = ns("ns-train", ["vedal-gs", *quick_train_args("ply", 10, outputs), "--pipeline.model.init-ply", str(ply),
                           "--pipeline.model.finetune-start-step", "500", "--pipeline.model.hard-prune-step", "509",
                           "--pipeline.model.importance-views", "6", "--pipeline.model.importance-downscale", "2",
                           "nsp-default-scene", "--data", str(default_scene)], cwd=tmp_path)
    out = proc.stdout.replace("\n", " ")
    assert f"fine-tuning from step 500 with {len(source)} Gaussians" in out
    report = json.loads((run_dir(outputs, "ply", "vedal-gs") / "pruning.json").read_text())
    assert report["final_gaussians"] <= len(source)
