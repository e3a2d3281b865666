"""Bad input to ns-train with this plugin's methods: one clear error line, exit status 1, nothing lost or overwritten.

Config values (prune fractions outside (0, 1), round lists of different lengths) are refused by the configs and
tested in test_removal / test_vedal_gs; NaN scores in test_removal and test_fisher. Here: what reaches a trainer.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from e2e import BIN, quick_train_args
from nerfstudio_pruning.data.dataparser import DefaultSceneDataParserConfig


def trainer_config(method: str, data: Path, output_dir: Path, **fields):
    from nerfstudio_pruning.methods import registry

    spec = {"pup-gs": registry.pup_gs, "vedal-gs": registry.vedal_gs}[method]
    config = copy.deepcopy(spec.config)
    config.pipeline.datamanager.dataparser = DefaultSceneDataParserConfig(data=data)
    config.output_dir = output_dir
    config.vis = "tensorboard"
    config.set_timestamp()
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def refusal_line(config, capsys) -> str:
    """Set the trainer up; return its one error line (and check there was exactly one, and exit status 1)."""
    trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(SystemExit) as exited:
        trainer.setup()
    assert exited.value.code == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-2000:]
    assert not list(config.get_base_dir().glob("nerfstudio_models/*.ckpt"))
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "nerfstudio_models").glob("*.ckpt"))[-1]


def rewritten_checkpoint(source: Path, target: Path, edit) -> Path:
    state = torch.load(source, map_location="cpu", weights_only=True)
    edit(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def test_dataset_without_seed_points_is_refused_unless_random_init_is_asked_for(default_scene, tmp_path, capsys):
    scene = tmp_path / "scene-without-points"
    shutil.copytree(default_scene, scene)
    (scene / "points.npz").unlink()
    line = refusal_line(trainer_config("pup-gs", scene, tmp_path / "out"), capsys)
    assert "no seed points" in line and "--pipeline.model.random-init True" in line

    config = trainer_config("pup-gs", scene, tmp_path / "out")
    config.pipeline.model.random_init = True
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer.pipeline.model.num_points == config.pipeline.model.num_random


@pytest.mark.parametrize("case", ["not Gaussians", "empty model", "other SH degree"])
def test_unusable_checkpoints_are_refused_and_left_as_they_were(splatfacto_run, default_scene, tmp_path, capsys, case):
    source = last_checkpoint(splatfacto_run)
    before = digest(source)

    def not_gaussians(state):
        state["pipeline"] = {"_model.field.mlp_base.params": torch.zeros(16), "_model.device_indicator_param": torch.zeros(0)}

    def empty(state):
        for key in [k for k in state["pipeline"] if k.startswith("_model.gauss_params.")]:
            state["pipeline"][key] = state["pipeline"][key][:0]

    edit, expected, fields = {
        "not Gaussians": (not_gaussians, "holds no Gaussians", {}),
        "empty model": (empty, "empty model (0 Gaussians)", {}),
        "other SH degree": (lambda state: None, "SH degree 3", {"sh_degree": 1}),
    }[case]
    checkpoint = rewritten_checkpoint(source, tmp_path / "given" / "step-000000149.ckpt", edit)
    config = trainer_config("pup-gs", default_scene, tmp_path / "out", load_checkpoint=checkpoint)
    for name, value in fields.items():
        setattr(config.pipeline.model, name, value)
    line = refusal_line(config, capsys)
    assert expected in line, line
    if case == "other SH degree":
        assert "--pipeline.model.sh-degree 3" in line
    assert digest(source) == before


def test_checkpoint_of_another_scene_is_refused(splatfacto_run, default_scene, tmp_path, capsys):
    """The run folder of the checkpoint records the frame its poses were normalised into; another scene's differs."""
    other_run = tmp_path / "other-scene-run"
    checkpoint = other_run / "nerfstudio_models" / last_checkpoint(splatfacto_run).name
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(last_checkpoint(splatfacto_run), checkpoint)
    recorded = (splatfacto_run / "dataparser_transforms.json").read_text()
    scale = float(re.search(r'"scale":\s*([0-9.eE+-]+)', recorded).group(1))
    (other_run / "dataparser_transforms.json").write_text(recorded.replace(repr(scale), repr(scale * 1.7)))
    before = digest(checkpoint)
    config = trainer_config("vedal-gs", default_scene, tmp_path / "out", load_dir=checkpoint.parent)
    line = refusal_line(config, capsys)
    assert "another scene" in line and "would not line up" in line
    assert digest(checkpoint) == before


def failed_ns_train(args, cwd: Path):
    """Run ns-train expecting a refusal: exit status 1 and no traceback. Returns its output and its error lines."""
    proc = subprocess.run([str(BIN / "ns-train"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    return output, [line for line in output.splitlines() if line.startswith("error:")]


def test_missing_data_path_prints_one_line_without_a_traceback(tmp_path):
    output, errors = failed_ns_train(["vedal-gs", *quick_train_args("missing", 10, tmp_path / "out"),
                                      "nerfstudio-data", "--data", str(tmp_path / "no-such-capture")], tmp_path)
    assert errors == [f"error: data path {tmp_path / 'no-such-capture'} does not exist"], output[-2000:]


def test_pup_schedule_refused_mid_run_saves_the_model_and_stops(default_scene, tmp_path):
    outputs = tmp_path / "out"
    output, errors = failed_ns_train(
        ["pup-gs", *quick_train_args("too-few", 40, outputs),
         "--pipeline.model.prune-start-step", "20", "--pipeline.model.min-gaussians", "1000000",
         "nsp-default-scene", "--data", str(default_scene)], tmp_path)
    assert len(errors) == 1 and "fewer than min_gaussians=1000000; nothing was pruned" in errors[0], output[-3000:]
    # Nothing lost: the 20 steps trained before the refusal are in a checkpoint, unpruned.
    saved = outputs / "too-few" / "pup-gs" / "run" / "nerfstudio_models" / "step-000000019.ckpt"
    state = torch.load(saved, map_location="cpu", weights_only=True)["pipeline"]
    assert int(state["_model._extra_state"]["pup"]["rounds_done"]) == 0 and state["_model.gauss_params.means"].shape[0] >= 4000
