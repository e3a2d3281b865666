"""vedal-gs: the model's own pieces on a tiny scene built in memory, then the whole schedule through ns-train and
ns-export on the built-in scene."""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import fields

import pytest
import torch
from types import SimpleNamespace
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.scene_box import SceneBox
from plyfile import PlyData

from conftest import VEDAL_SAVE_BEFORE_REMOVAL as SAVE_BEFORE_REMOVAL
from conftest import VEDAL_STEPS as STEPS
from e2e import ns, ns_eval
from nerfstudio_pruning.vedal.gate import ConvergenceGate
from nerfstudio_pruning.methods.vedal_gs import HIDDEN_OPACITY_LOGIT, VedalGSModel, VedalGSModelConfig
from nerfstudio_pruning.vedal.controller import ImportancePassWindow, VedalConfig
from nerfstudio_pruning.vedal.retention_head import PartialLogits, RetentionHead, gaussian_features
pytestmark = pytest.mark.usefixtures("single_thread")

N_TINY = 48
SIZE = 16
EXPORT_OPACITY_FLOOR = -5.5373  # ns-export drops Gaussians whose opacity logit is below logit(1/255)




def tiny_model(n: int = N_TINY, seed: int = 0, **overrides) -> VedalGSModel:
    generator = torch.Generator().manual_seed(seed)
    points = (torch.rand(n, 3, generator=generator) - 0.5) * 0.6
    colours = (torch.rand(n, 3, generator=generator) * 255).to(torch.uint8)
    settings = dict(finetune_start_step=0, hard_prune_step=100, num_downscales=0, sh_degree=1, min_gaussians=8)
    settings.update(overrides)
    vedal = {f.name for f in fields(VedalConfig)}
    config = VedalGSModelConfig(vedal=VedalConfig(**{k: v for k, v in settings.items() if k in vedal}),
                                **{k: v for k, v in settings.items() if k not in vedal})
    scene_box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    model = config.setup(scene_box=scene_box, num_train_data=1, seed_points=(points, colours))
    # What the trainer's step callback would have set.
    model.step = 50
    model.optimizers = {name: torch.optim.Adam([p], lr=1e-3) for name, p in model.gauss_params.items()}
    return model


def tiny_camera() -> Cameras:
    # Looking down -z (OpenGL convention) from z = 2 at the cloud around the origin.
    c2w = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]]])
    return Cameras(camera_to_worlds=c2w, fx=20.0, fy=20.0, cx=SIZE / 2, cy=SIZE / 2, width=SIZE, height=SIZE,
                   camera_type=CameraType.PERSPECTIVE)


def start_with_gate(model: VedalGSModel, gated: torch.Tensor, logits: torch.Tensor) -> None:
    """Fine-tuning started, `gated` eligible, p fixed through the frozen logits."""
    model.vedal.finetune_started_at = 0
    model.vedal.gate = ConvergenceGate(model.config.vedal.gate, model.num_points)
    model.vedal.gate.eligible = gated.clone()
    model.vedal.frozen_logits = logits.clone()


def test_eval_opacities_hide_exactly_the_gated_gaussians_below_the_threshold():
    model = tiny_model()
    n = model.num_points
    gated = torch.arange(n) % 2 == 0
    p = torch.linspace(0.02, 0.98, n)
    start_with_gate(model, gated, torch.logit(p))
    raw = model.gauss_params["opacities"].detach().clone()

    model.train()
    assert model.opacities is model.gauss_params["opacities"]

    model.eval()
    hidden = gated & (p < 0.5)
    shown = model.opacities.squeeze(-1)
    assert torch.all(shown[hidden] == HIDDEN_OPACITY_LOGIT)
    assert torch.equal(shown[~hidden], raw.squeeze(-1)[~hidden])
    assert HIDDEN_OPACITY_LOGIT < EXPORT_OPACITY_FLOOR and math.isfinite(HIDDEN_OPACITY_LOGIT)
    # Ungated Gaussians with a low p stay: the reconstruction loss never constrained their p.
    assert not (~gated & (p < 0.5) & (shown == HIDDEN_OPACITY_LOGIT)).any()
    assert model.kept_count_description().startswith(f"{n - int(hidden.sum())} of {n} shown")

    model.retention_threshold_slider.value = 0.9
    assert torch.equal(model.hidden_mask(), gated & (p < 0.9))
    model.update_kept_count_text()
    hidden_at_09 = int((gated & (p < 0.9)).sum())
    assert model.kept_count_text.content == (
        f"**Gaussians shown**: {n - hidden_at_09} of {n} shown ({hidden_at_09} of the {int(gated.sum())} gated "
        "hidden at 0.90)")


def viewer_showing(output: str, split_output: str = "rgb", split: bool = False) -> SimpleNamespace:
    """What a running viewer hands its ViewerControls: here only the control panel's output selection."""
    panel = SimpleNamespace(output_render=output, split=split, split_output_render=split_output)
    return SimpleNamespace(control_panel=panel, viser_server=None, _trigger_rerender=lambda: None)


def test_the_kept_count_follows_the_slider_without_a_render_and_states_the_hard_removal():
    model = tiny_model()
    n = model.num_points
    gated = torch.arange(n) % 2 == 0
    p = torch.linspace(0.02, 0.98, n)
    start_with_gate(model, gated, torch.logit(p))
    model.eval()
    model.viewer_outputs._setup(viewer_showing("rgb"))
    with torch.no_grad():
        model.get_outputs(tiny_camera())  # a frame: the count's inputs are taken from the model
    renders = []
    model.get_outputs = lambda *args: renders.append(args)  # from here on any render would be recorded
    for threshold in (0.2, 0.7):
        model.threshold_moved(threshold)  # what the slider's own callback calls, before nerfstudio's locked one
        hidden = int((gated & (p < threshold)).sum())
        assert model.kept_count_text.content.startswith(f"**Gaussians shown**: {n - hidden} of {n} shown")
    assert renders == []

    # After a hard removal in this process the count says what it removed.
    model.head_logits = lambda: torch.logit(p)  # the removal asks the head, whose p here is the frozen one
    model.hard_prune(step=99)
    survivors = model.num_points
    assert survivors == n - int((gated & (p < 0.5)).sum())
    assert model.kept_count_description(0.5) == (
        f"{survivors} of {survivors} shown (0 of the {int(model.gated_mask().sum())} gated hidden at 0.50; "
        f"hard removal at step 99: {n} -> {survivors})")
    # A model loaded from a checkpoint does not know the count before the removal, and says so.
    model._hard_removal = None
    assert model.kept_count_description(0.5).endswith(
        "; the hard removal (gated, p < 0.5) already ran: checkpoints do not keep the count before it)")


def test_the_retention_output_is_rendered_only_while_the_viewer_shows_it():
    model = tiny_model()
    n = model.num_points
    gated = torch.ones(n, dtype=torch.bool)
    # p = 0.1 for the first half (hidden from rgb), 0.8 for the second: the output must show both.
    p = torch.where(torch.arange(n) < n // 2, 0.1, 0.8)
    start_with_gate(model, gated, torch.logit(p))
    model.eval()
    renders = []
    render_value_image = model.render_value_image
    model.render_value_image = lambda *args: renders.append(args) or render_value_image(*args)
    with torch.no_grad():
        assert "retention" not in model.get_outputs(tiny_camera())  # no viewer (ns-eval, ns-render): no output
        model.viewer_outputs._setup(viewer_showing("rgb"))
        while_rgb = model.get_outputs(tiny_camera())
        assert renders == []  # shown: rgb; the key is there for the Output type list, at no render cost
        assert torch.equal(while_rgb["retention"], torch.zeros(SIZE, SIZE, 1))
        model.viewer_outputs._setup(viewer_showing("rgb", split_output="retention", split=True))
        assert len(renders) == 0 and model.get_outputs(tiny_camera())["retention"].abs().amax() > 0
        assert len(renders) == 1  # the split screen's second output counts as shown
        model.viewer_outputs._setup(viewer_showing("retention"))
        outputs = model.get_outputs(tiny_camera())
    assert len(renders) == 2
    retention = outputs["retention"]
    assert retention.shape == (SIZE, SIZE, 1) and retention.dtype == torch.float32  # nerfstudio's colormaps apply
    # Every Gaussian is drawn with its p, hidden ones included: pixels read 0.1, 0.8 or mixtures of them, 0 where
    # nothing is drawn.
    drawn = retention[retention > 0]
    assert drawn.numel() > 0 and drawn.min() >= 0.1 - 1e-4 and drawn.max() <= 0.8 + 1e-4
    assert (drawn < 0.2).any() and (drawn > 0.7).any()
    # Where both kinds overlap, the value is their compositing-weighted mean, which matches the rgb render of the
    # same Gaussians painted grey p (composited onto the background).
    with torch.no_grad(), model.rendering_with(opacities=model.gauss_params["opacities"]):
        grey = model.render_value_image(tiny_camera(), p)
    assert torch.allclose(grey, retention, atol=1e-5)


def test_a_starting_viewer_renders_a_small_first_frame_on_the_thread_that_starts_it():
    """The viewer interrupts frames from a trace function; one interrupted inside numba's first kernel load left numba
    half imported and killed the render thread. So the first frame is rendered when the viewer starts, on the
    thread that starts it (before any render thread exists), as the viewer renders, and the model is left training."""
    from nerfstudio_pruning.methods.base import FIRST_FRAME_SIDE

    model = tiny_model()
    model.train()
    frames = []
    get_outputs_for_camera = model.get_outputs_for_camera

    def recording(camera, obb_box=None):
        outputs = get_outputs_for_camera(camera, obb_box=obb_box)
        frames.append((threading.get_ident(), int(camera.width), int(camera.height), model.training,
                       torch.is_grad_enabled(), float(outputs["accumulation"].amax())))
        return outputs

    model.get_outputs_for_camera = recording
    model.viewer_outputs._setup(viewer_showing("rgb"))  # a viewer without training cameras: nothing to render
    assert frames == []
    # A 160x120 training camera with tiny_camera's view and field of view.
    c2w = tiny_camera().camera_to_worlds
    train_cameras = Cameras(camera_to_worlds=c2w, fx=200.0, fy=200.0, cx=80.0, cy=60.0, width=160, height=120,
                            camera_type=CameraType.PERSPECTIVE)
    viewer = viewer_showing("rgb")
    viewer.pipeline = SimpleNamespace(datamanager=SimpleNamespace(train_dataset=SimpleNamespace(cameras=train_cameras)))
    model.viewer_outputs._setup(viewer)
    assert len(frames) == 1
    thread, width, height, training, grad, drawn = frames[0]
    assert thread == threading.get_ident() and (width, height) == (FIRST_FRAME_SIDE, FIRST_FRAME_SIDE * 3 // 4)
    assert not training and not grad and drawn > 0.5  # eval mode, no gradients, and Gaussians were drawn
    assert model.training and int(train_cameras.width) == 160  # the model trains on; the dataset's camera unscaled
    # A frame that fails (a camera model splatfacto cannot draw, say) does not stop the viewer from starting.
    model.get_outputs_for_camera = lambda camera, obb_box=None: 1 / 0
    model.viewer_outputs._setup(viewer)
    assert model.training


# dynamo's bytecode tracer, and its fake-tensor run of an op: dynamo wraps an exception raised there differently.
@pytest.mark.parametrize("where", ["torch/_dynamo/symbolic_convert.py", "torch/_subclasses/fake_tensor.py"])
def test_a_viewer_interrupt_inside_torch_compile_reaches_the_viewer_as_its_own(where, monkeypatch):
    """ns-viewer stops a frame by raising IOChangeException from a trace function at the next Python line. Inside
    torch.compile's tracing of splatfacto's get_viewmat, dynamo rewraps it, and the viewer's render thread died of
    that (the browser test's pup-gs page, 1 load in 8). The frame must stop with the viewer's own exception, and the
    next frame render. get_viewmat is compiled on CUDA tensors only (methods/base.py); here it is compiled on CPU
    ones too, as a GPU model has it."""
    from nerfstudio.viewer_legacy.server.viewer_utils import IOChangeException, SetTrace

    from nerfstudio_pruning.methods import base

    monkeypatch.setattr(base, "_eager_get_viewmat", base.get_viewmat.compiled)
    model = tiny_model()
    model.eval()
    torch._dynamo.reset()  # get_viewmat is compiled again by the next frame, as by the first of a process
    inside_dynamo = []

    def interrupt_inside_dynamo(frame, event, arg):
        if event == "line" and frame.f_code.co_filename.replace("\\", "/").endswith(where):
            inside_dynamo.append(frame.f_code.co_filename)
            raise IOChangeException
        return interrupt_inside_dynamo

    with pytest.raises(IOChangeException), SetTrace(interrupt_inside_dynamo):
        model.get_outputs_for_camera(tiny_camera())
    assert inside_dynamo, "the frame never reached torch.compile: the test would pass without the fix"
    assert model.get_outputs_for_camera(tiny_camera())["rgb"].shape == (SIZE, SIZE, 3)


def test_pixels_of_the_value_image_are_weighted_means_of_the_gaussians_values():
    model = tiny_model()
    model.eval()
    model.set_background(torch.tensor([0.3, 0.6, 0.9]))  # the value image must not depend on it
    with torch.no_grad():
        rgb = model.get_outputs(tiny_camera())
        for value in (0.0, 0.25, 1.0):  # a weighted mean of equal values is that value, wherever anything is drawn
            image = model.render_value_image(tiny_camera(), torch.full((model.num_points,), value))
            drawn = rgb["accumulation"] > 1 / 255
            assert drawn.any() and (~drawn).any()
            assert torch.allclose(image[drawn], torch.full_like(image[drawn], value), atol=1e-4)
            assert torch.all(image[~drawn] == 0)


def test_training_masks_gated_gaussians_and_adds_the_regulariser_with_head_gradients():
    model = tiny_model()
    n = model.num_points
    model.train()
    model.vedal.finetune_started_at = 0
    model.vedal.gate = ConvergenceGate(model.config.vedal.gate, n)

    raw = model.gauss_params["opacities"].squeeze(-1)

    def training_opacities():
        gated = model.gated_mask()
        return torch.sigmoid(model.vedal.sampled_opacity_logits(raw, model.head_logits(), gated, model.step))

    torch.manual_seed(0)
    assert torch.allclose(training_opacities(), torch.sigmoid(raw), rtol=1e-6, atol=0)
    image = (torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8)
    outputs = model.get_outputs(tiny_camera())
    assert "retention_kl" not in model.get_loss_dict(outputs, {"image": image})

    gated = torch.arange(n) < n // 2
    model.vedal.gate.eligible = gated
    model.vedal.importance_scale = 1e-6  # as after a gate update: kl_weight is relative to the mean importance
    with torch.no_grad():
        model.retention_head.output.bias.fill_(0.0)  # p near 1/2: samples well inside (0, 1)
    masked = training_opacities()
    unmasked = torch.sigmoid(raw)
    assert torch.equal(masked[~gated], unmasked[~gated])
    assert (masked[gated] <= unmasked[gated]).all() and (masked[gated] < 0.9 * unmasked[gated]).any()

    outputs = model.get_outputs(tiny_camera())
    assert "retention_logits" in outputs  # the sampled render hands its logits to the loss through the outputs
    losses = model.get_loss_dict(outputs, {"image": image})
    assert losses["retention_kl"] > 0 and losses["retention_sparsity"] > 0
    sum(losses.values()).backward()
    assert model.retention_head.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", [None, 12])
def test_a_training_step_with_the_head_on_the_gated_rows_matches_one_with_every_row(target):
    """A whole training step (render, loss, backward) of the tiny model with the head evaluated on the gated rows
    (the default) and with it on every row (`head_logits`, the path before), from the same random state, in the
    sampled phase, the hand-over and the fixed decision: the reconstruction loss, the KL and every Gaussian
    parameter's gradient agree to float rounding (the gated rows' logits differ from forward's in the last bits of
    the odd row: tests/test_retention_head.py), the head's gradient is the same estimator from the same rows; the
    sparsity term is the unbiased estimate. With a target of 12 of 48 and 16 gated, the removal takes 20 ungated
    Gaussians by their importance."""
    models = [tiny_model(head_gradient_rows=16, target_gaussians=target) for _ in range(2)]
    n = models[0].num_points
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.train()
        model.vedal.finetune_started_at, model.vedal.start_gaussians = 0, n
        model.vedal.gate = ConvergenceGate(model.vedal.gate_config(), n)
        model.vedal.gate.update(torch.linspace(0, 1, n), step=0)
        model.vedal.gate.eligible = torch.arange(n) % 3 == 0
        model.vedal.importance_scale = 1e-3
        with torch.no_grad():
            model.retention_head.output.bias.fill_(0.0)  # p near 1/2: samples well inside (0, 1)
    every_row = models[0]
    every_row.training_head_logits = lambda gated: every_row.head_logits()
    image = (torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8)
    for step in (50, 93, 97):  # sampled masks, the hand-over to the removal's mask, its fixed decision
        results = []
        for model in models:
            model.step = step
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            outputs = model.get_outputs(tiny_camera())
            assert isinstance(outputs.get("retention_logits"), PartialLogits) == (model is models[1] and step < 97)
            losses = model.get_loss_dict(outputs, {"image": image})
            sum(losses.values()).backward()
            results.append((losses, {name: p.grad for name, p in model.named_parameters()}))
        (losses, grads), (losses_p, grads_p) = results
        assert losses.keys() == losses_p.keys()
        assert ("retention_kl" in losses) == (step < 97)
        for name in losses:
            if name != "retention_sparsity":
                torch.testing.assert_close(losses_p[name], losses[name], rtol=1e-5, atol=1e-8)
        assert grads.keys() == grads_p.keys()
        assert (grads["retention_head.output.weight"] is None) == (step == 97)  # no head after the decision
        for name, grad in grads.items():
            if grad is None:
                assert grads_p[name] is None
                continue
            if name in ("gauss_params.opacities", "gauss_params.means", "retention_head.output.weight"):
                assert grad.abs().sum() > 0
            torch.testing.assert_close(grads_p[name], grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(models[1].vedal.decided, models[0].vedal.decided)
    if target is not None:
        assert int(models[1].vedal.decided.sum()) == n - target
        assert int((models[1].vedal.decided & ~models[1].gated_mask()).sum()) == n - target - n // 3


def _gate_and_split_the_head(model: VedalGSModel) -> torch.Tensor:
    """Gate two Gaussians in three and move about half below p = 0.5; returns the gated & p < 0.5 mask."""
    n = model.num_points
    model.vedal.finetune_started_at = 0
    model.vedal.gate = ConvergenceGate(model.config.vedal.gate, n)
    gated = torch.arange(n) % 3 != 0
    model.vedal.gate.eligible = gated.clone()
    model.vedal.gate.ema = torch.arange(n, dtype=torch.float32)
    with torch.no_grad():
        logits = model.head_logits()
        # Push half of the Gaussians below p = 0.5 through the head's output bias, relative to the median.
        model.retention_head.output.bias -= logits.median()
        logits = model.head_logits()
    prune = gated & (logits < 0)
    assert 0 < int(prune.sum()) < n
    return prune


def test_hard_prune_removes_gated_gaussians_below_one_half_and_keeps_state_aligned():
    model = tiny_model()
    n = model.num_points
    prune = _gate_and_split_the_head(model)
    logits = model.head_logits().detach()
    means = model.means.detach().clone()

    removed = model.hard_prune(step=100)

    assert removed == int(prune.sum()) and model.num_points == n - removed and model.vedal.pruned
    assert torch.equal(model.means.detach(), means[~prune])
    assert torch.equal(model.vedal.gate.ema, torch.arange(n, dtype=torch.float32)[~prune])
    assert torch.equal(model.vedal.frozen_logits, logits[~prune])
    model.eval()
    assert not model.hidden_mask().any()
    assert model.optimizers["means"].param_groups[0]["params"][0] is model.gauss_params["means"]


def test_hard_prune_below_min_gaussians_is_refused_and_changes_nothing():
    model = tiny_model(min_gaussians=N_TINY)
    _gate_and_split_the_head(model)
    assert model.hard_prune(step=100) == 0
    assert model.num_points == N_TINY and not model.vedal.pruned and model.vedal.frozen_logits is None


def test_checkpoint_round_trip_with_weights_only_and_another_number_of_gaussians(tmp_path):
    source = tiny_model(n=60, seed=1)
    n = source.num_points
    source.vedal.finetune_started_at = 7
    source.vedal.last_refresh_step = 40
    source.vedal.refresh_count = 5
    source.vedal.pruned = True
    source.vedal.gate = ConvergenceGate(source.config.vedal.gate, n)
    for step in range(3):
        source.vedal.gate.update(torch.rand(n), step)
    source.vedal.frozen_logits = torch.randn(n)
    source.vedal.window = ImportancePassWindow(slots=3, num_gaussians=n, device=torch.device("cpu"))
    source.vedal.window.add(4, torch.rand(n, dtype=torch.float64), n_views=5)
    source.strategy_state.update(grad2d=torch.rand(n), count=torch.arange(n, dtype=torch.float32))
    with torch.no_grad():
        source.retention_head.output.bias.fill_(1.25)
        source.retention_head.set_bounds(-0.5, 0.5)
    path = tmp_path / "model.ckpt"
    torch.save({"pipeline": {f"_model.{k}": v for k, v in source.state_dict().items()}}, path)

    state = torch.load(path, map_location="cpu", weights_only=True)["pipeline"]
    target = tiny_model(n=N_TINY, seed=2)
    assert target.num_points != n
    target.load_state_dict({k[len("_model."):]: v for k, v in state.items()})

    assert target.num_points == n
    assert (target.vedal.finetune_started_at, target.vedal.last_refresh_step, target.vedal.refresh_count, target.vedal.pruned) == (7, 40, 5, True)
    assert torch.equal(target.vedal.frozen_logits, source.vedal.frozen_logits)
    assert torch.equal(target.vedal.gate.ema, source.vedal.gate.ema) and target.vedal.gate.history == source.vedal.gate.history
    assert torch.equal(target.vedal.window.sums, source.vedal.window.sums)
    assert target.vedal.window.view_counts == [0, 5, 0]
    # densification's running statistics come back too, so a resumed run densifies as the uninterrupted one
    assert torch.equal(target.strategy_state["grad2d"], source.strategy_state["grad2d"])
    assert torch.equal(target.strategy_state["count"], source.strategy_state["count"])
    assert target.retention_head.output.bias.item() == 1.25
    assert torch.equal(target.retention_head.bounds_hi, torch.full((3,), 0.5))


def test_a_diverged_gaussian_does_not_make_every_retention_probability_nan():
    model = tiny_model()
    with torch.no_grad():
        model.gauss_params["means"][3] = float("nan")
        model.gauss_params["scales"][5] = float("inf")
    assert torch.isfinite(model.head_logits()).all()


@pytest.mark.parametrize("other_extra_state", ["none", "splatfacto-portable"])
def test_loads_a_checkpoint_of_another_method_with_fresh_vedal_state(other_extra_state):
    other = tiny_model(n=30, seed=3)
    other_keys = {k: v for k, v in other.state_dict().items() if not k.startswith(("retention_head.", "_extra_state"))}
    if other_extra_state == "splatfacto-portable":
        other_keys["_extra_state"] = {"strategy_state": {"grad2d": torch.ones(30), "count": None}}
    model = tiny_model()
    model.load_state_dict(other_keys)
    assert model.num_points == 30 and model.vedal.finetune_started_at == -1 and not model.vedal.pruned
    assert model.vedal.gate.num_gaussians == 0 and not model.gated_mask().any()


def test_config_refuses_a_hard_prune_before_fine_tuning():
    with pytest.raises(ValueError, match="hard_prune_step"):
        VedalConfig(finetune_start_step=100, hard_prune_step=50)


# -- end to end ------------------------------------------------------------------------------------------------------
REMOVAL_LINE = re.compile(
    r"hard removal at step (\d+): removed (\d+) of (\d+) Gaussians, (\d+) remain \(gated fraction was ([\d.]+), "
    r"gate reversal rate ([\d.]+)\)"
)


def _checkpoint(run, step: int) -> dict:
    return torch.load(run / "nerfstudio_models" / f"step-{step:09d}.ckpt", map_location="cpu", weights_only=True)["pipeline"]


def _export_count(config, out, cwd) -> int:
    ns("ns-export", ["gaussian-splat", "--load-config", str(config), "--output-dir", str(out)], cwd=cwd)
    return PlyData.read(str(out / "splat.ply"))["vertex"].count


def _hidden_at_inference(state: dict, model_config: VedalGSModelConfig) -> torch.Tensor:
    """Gated Gaussians with p < 0.5, recomputed from the checkpoint with a head of its own."""
    head = RetentionHead(model_config.vedal.retention_head_config())
    head.load_state_dict({k[len("_model.retention_head."):]: v for k, v in state.items()
                          if k.startswith("_model.retention_head.")})
    with torch.no_grad():
        features = gaussian_features(state["_model.gauss_params.opacities"], state["_model.gauss_params.scales"])
        p = torch.sigmoid(head(state["_model.gauss_params.means"], features))
    return state["_model._extra_state"]["vedal"]["gate"]["eligible"] & (p < 0.5)


def test_schedule_gates_and_removes_then_export_matches_the_model(vedal_run, e2e_root):
    proc, run = vedal_run
    found = REMOVAL_LINE.findall(" ".join(proc.stdout.split()))  # rich wraps long lines at the console width
    assert len(found) == 1, proc.stdout[-3000:]
    step, removed, before, remain, gated_fraction, reversal_rate = found[0]
    removed, before, remain = int(removed), int(before), int(remain)
    print(f"\nvedal-gs e2e: {before} -> {remain} Gaussians (removed {removed}), gated fraction {gated_fraction}, "
          f"reversal rate {reversal_rate}")
    assert int(step) == STEPS - 1 and float(gated_fraction) > 0 and removed > 0 and remain == before - removed

    before_removal = _checkpoint(run, SAVE_BEFORE_REMOVAL)
    final = _checkpoint(run, STEPS - 1)
    assert before_removal["_model.gauss_params.means"].shape[0] == before
    assert final["_model.gauss_params.means"].shape[0] == remain < before
    extra = final["_model._extra_state"]["vedal"]
    assert extra["pruned"] and extra["gate"]["ema"].shape == (remain,)
    assert extra["frozen_retention_logits"].shape == (remain,) and extra["gate"]["eligible"].any()

    low_opacity = int((final["_model.gauss_params.opacities"] < EXPORT_OPACITY_FLOOR).sum())
    assert _export_count(run / "config.yml", e2e_root / "vedal_export", e2e_root) == remain - low_opacity

    # ns-eval renders in eval mode (no viewer: no retention output); after the removal nothing is left to hide.
    results = ns_eval(run / "config.yml", cwd=e2e_root)
    assert results["num_gaussians"] == remain and results["retained_gaussians"] == remain
    assert math.isfinite(results["psnr"])


def test_the_run_writes_its_importance_time_gate_and_removal_to_pruning_json(vedal_run):
    _, run = vedal_run
    report = json.loads((run / "pruning.json").read_text())
    assert report.keys() == {"method", "importance_seconds", "importance_passes", "gate", "hard_prune",
                             "target_gaussians", "final_gaussians"} and report["method"] == "vedal-gs"
    assert report["target_gaussians"] is None  # no target asked
    final = _checkpoint(run, STEPS - 1)
    vedal = final["_model._extra_state"]["vedal"]
    remain = final["_model.gauss_params.means"].shape[0]
    # One leave-one-out measurement per refresh: every 10 steps from step 80 until the removal.
    assert report["importance_passes"] == vedal["refresh_count"] == len(range(80, STEPS - 1, 10))
    assert report["importance_seconds"] > 0
    gate = report["gate"]
    assert gate.keys() == {"eligible_fraction", "grants", "reversals"}
    assert 0 < gate["eligible_fraction"] <= 1 and gate["grants"] > 0 and 0 <= gate["reversals"] <= gate["grants"]
    assert (gate["grants"], gate["reversals"]) == (vedal["gate"]["grant_count"], vedal["gate"]["reversal_count"])
    before = _checkpoint(run, SAVE_BEFORE_REMOVAL)["_model.gauss_params.means"].shape[0]
    assert report["hard_prune"] == {"step": STEPS - 1, "gaussians_before": before, "gaussians_after": remain}
    assert remain < before and report["final_gaussians"] == remain
    # Kept in the checkpoint (loaded with weights_only=True), so a resumed run goes on counting.
    assert vedal["hard_prune"] == report["hard_prune"] and vedal["importance_passes"] == report["importance_passes"]
    assert final["_model._extra_state"]["vedal_importance_seconds"] == report["importance_seconds"]
    before_removal = _checkpoint(run, SAVE_BEFORE_REMOVAL)["_model._extra_state"]["vedal"]
    assert before_removal["hard_prune"] == {} and 0 < before_removal["importance_passes"] < report["importance_passes"]


def test_export_before_the_hard_removal_writes_only_retained_gaussians(vedal_run, e2e_root):
    _, run = vedal_run
    config_text = (run / "config.yml").read_text()
    assert "load_step: null" in config_text
    stopped_early = run / f"config_step_{SAVE_BEFORE_REMOVAL}.yml"
    stopped_early.write_text(config_text.replace("load_step: null", f"load_step: {SAVE_BEFORE_REMOVAL}"))
    state = _checkpoint(run, SAVE_BEFORE_REMOVAL)
    assert not state["_model._extra_state"]["vedal"]["pruned"]

    model_config = VedalGSModelConfig(vedal=VedalConfig(finetune_start_step=80, hard_prune_step=STEPS - 1))
    hidden = _hidden_at_inference(state, model_config)
    low_opacity = (state["_model.gauss_params.opacities"] < EXPORT_OPACITY_FLOOR).squeeze(-1)
    n = hidden.numel()
    assert hidden.any(), "nothing hidden before the removal: the check below would not test the mask"
    count = _export_count(stopped_early, e2e_root / "vedal_export_early", e2e_root)
    assert count == n - int((hidden | low_opacity).sum())


def test_with_a_target_the_removal_keeps_exactly_that_many_and_eval_hides_exactly_those():
    model = tiny_model(target_gaussians=20)
    n = model.num_points
    _gate_and_split_the_head(model)
    model.vedal.start_gaussians = n
    logits = model.head_logits().detach()
    gated = model.gated_mask()
    model.eval()
    hidden = model.hidden_mask()
    assert int(hidden.sum()) == n - 20 and not hidden[~gated].any()
    assert logits[hidden].max() <= logits[gated & ~hidden].min()
    model.train()
    assert model.hard_prune(step=100) == n - 20 and model.num_points == 20
    model.eval()
    assert not model.hidden_mask().any()  # the removal was the mask: nothing more is hidden after it


def test_the_kept_count_names_ungated_gaussians_a_target_removes_and_the_target_after_the_removal():
    """A target beyond what the gate has made eligible removes ungated Gaussians too (lowest importance EMA): the
    count must not call them gated, and a loaded model's count must name the target, not "p < 0.5"."""
    model = tiny_model()
    n = model.num_points
    _gate_and_split_the_head(model)  # two in three gated
    keep = n // 5  # more to remove than are gated
    model.vedal.config.target_gaussians = keep
    model.vedal.start_gaussians = n
    model.vedal.gate.history = [(0, 2 / 3, 0)]  # the gate has observed every Gaussian
    gated = model.gated_mask()
    model.eval()
    hidden = model.hidden_mask()
    ungated_hidden = int((hidden & ~gated).sum())
    assert int(hidden.sum()) == n - keep and ungated_hidden > 0
    assert model.kept_count_description(0.5) == (
        f"{keep} of {n} shown ({int(gated.sum())} of the {int(gated.sum())} gated hidden at 0.50 and "
        f"{ungated_hidden} ungated, by importance, for the target)")
    model.train()
    model.hard_prune(step=100)
    model._hard_removal = None  # as loaded from a checkpoint
    assert model.num_points == keep
    assert model.kept_count_description(0.5).endswith(
        f"; the hard removal (to the target of {keep}) already ran: checkpoints do not keep the count before it)")


def test_the_viewer_threshold_hides_fewer_as_it_moves_down_with_a_target_and_after_the_removal():
    """With a target the removal's set is a rank, not "p < 0.5", and after the removal it is empty while gated
    survivors may have p < 0.5: the hidden set must still shrink as the slider moves down and grow as it moves up,
    and be the removal's set at 0.5."""
    model = tiny_model(target_gaussians=20)
    n = model.num_points
    below_half = _gate_and_split_the_head(model)
    # Remove half of the gated with p < 0.5, so that the other half survives the removal.
    keep = n - int(below_half.sum()) // 2
    model.vedal.config.target_gaussians = keep
    model.vedal.start_gaussians = n
    gated = model.gated_mask()
    model.eval()
    thresholds = [0.01, 0.2, 0.4, 0.49, 0.5, 0.51, 0.6, 0.8, 0.99]

    def nested(masks):
        return all(bool((a & ~b).sum() == 0) for a, b in zip(masks, masks[1:]))

    before = [model.hidden_mask(t) for t in thresholds]
    assert nested(before) and int(before[thresholds.index(0.5)].sum()) == n - keep
    p = torch.sigmoid(model.retention_logits())
    for t, hidden in zip(thresholds, before):
        if t < 0.5:
            assert torch.equal(hidden, before[thresholds.index(0.5)] & (p < t))
    assert not any(m[~gated].any() for m in before)
    model.train()
    model.hard_prune(step=100)
    model.eval()
    survivors_gated = model.gated_mask()
    p_kept = torch.sigmoid(model.retention_logits())
    assert (survivors_gated & (p_kept < 0.5)).any(), "no gated survivor below 0.5: the check below would not test it"
    # Just below 0.5 yet above a gated survivor's p: "p < threshold" alone would hide it there and not at 0.5.
    just_below = 0.5 - float(0.5 - p_kept[survivors_gated].min()) / 2
    thresholds = sorted(thresholds + [just_below])
    after = [model.hidden_mask(t) for t in thresholds]
    assert nested(after)
    assert not after[thresholds.index(just_below)].any() and not after[thresholds.index(0.5)].any()
    above = 0.5 + float(p_kept[survivors_gated].max() - 0.5) / 2
    assert torch.equal(model.hidden_mask(above), survivors_gated & (p_kept < above))
    assert model.hidden_mask(above).any()


def test_a_training_step_reads_nothing_back_to_the_host_in_the_head_and_gate_path(monkeypatch):
    """The vedal-gs part of a fine-tuning step (mask, head, regulariser, and their backward) calls no .item(),
    bool(tensor), .tolist() or .cpu(): counted by patching them while a step runs, attributed by the caller's file
    (splatfacto's own code is not this plugin's to change)."""
    import sys

    model = tiny_model(head_gradient_rows=16)
    n = model.num_points
    model.train()
    model.vedal.finetune_started_at, model.vedal.start_gaussians = 0, n
    model.vedal.gate = ConvergenceGate(model.config.vedal.gate, n)
    model.vedal.gate.eligible = torch.arange(n) < n // 2
    model.vedal.importance_scale = 1e-6
    image = (torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8)
    ours = ("nerfstudio_pruning/vedal/", "nerfstudio_pruning/methods/vedal_gs.py")
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(part in caller for part in ours):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "__bool__", "tolist", "cpu", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    kinds = []
    for step in (50, 93, 97):  # sampled masks, the hand-over to the removal's mask, its fixed decision
        model.step = step
        outputs = model.get_outputs(tiny_camera())
        losses = model.get_loss_dict(outputs, {"image": image})
        sum(losses.values()).backward()
        kinds.append("retention_kl" in losses)
    monkeypatch.undo()
    assert kinds == [True, True, False] and model.retention_head.output.weight.grad.abs().sum() > 0
    assert calls == []
