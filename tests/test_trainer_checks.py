"""What `PruningTrainer` checks and shows before training: training views a method can score (one size, with
pixels at the scoring resolution), refused in one line at setup; and a progress display that counts the steps
of this run, so that post-hoc and resumed runs show the right percentage and ETA."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Type

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.configs.base_config import LocalWriterConfig, LoggingConfig
from nerfstudio.utils import writer

from nerfstudio_pruning.data.dataparser import DefaultSceneDataParser, DefaultSceneDataParserConfig
from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.methods.checks import check_training_views
from nerfstudio_pruning.methods.progress import show_progress_of_this_run
from nerfstudio_pruning.vedal.controller import VedalConfig
from test_bad_input import refusal_line, trainer_config


def cameras_of_sizes(*sizes):
    n = len(sizes)
    return Cameras(
        camera_to_worlds=torch.eye(4)[:3][None].repeat(n, 1, 1), fx=100.0, fy=100.0, cx=32.0, cy=24.0,
        width=torch.tensor([[w] for w, _ in sizes]), height=torch.tensor([[h] for _, h in sizes]),
        camera_type=CameraType.PERSPECTIVE,
    )


def test_views_of_one_size_pass_and_mixed_sizes_are_refused_only_where_scored():
    check_training_views(cameras_of_sizes((64, 48), (64, 48)), 4, "pup-gs")
    mixed = cameras_of_sizes((64, 48), (64, 48), (32, 24))
    check_training_views(mixed, None, "splatfacto-portable")  # renders per camera: any mix is fine
    with pytest.raises(InputError, match=r"pup-gs .* mixes 2 sizes: 64x48 \(2 images\), 32x24 \(1 images\)"):
        check_training_views(mixed, 4, "pup-gs")


def test_views_without_pixels_are_refused_for_every_method():
    with pytest.raises(InputError, match=r"1 training image\(s\) have no pixels \(the first, #1, is 0x48\)"):
        check_training_views(cameras_of_sizes((64, 48), (0, 48)), None, "splatfacto-portable")
    with pytest.raises(InputError, match="no training images"):
        check_training_views(cameras_of_sizes((64, 48))[torch.zeros(0, dtype=torch.long)], None, "vedal-gs")
    with pytest.raises(InputError, match="1/64 of the 64x48 training images, which leaves no pixel"):
        check_training_views(cameras_of_sizes((64, 48)), 64, "pup-gs")


def test_scoring_downscale_of_each_method():
    from nerfstudio_pruning.methods import registry

    assert registry.pup_gs.config.pipeline.model.scoring_downscale() == 4
    # The floor keeps the longer side of the scoring renders at 256 pixels or more.
    assert registry.pup_gs.config.pipeline.model.scoring_downscale(1237, 822) == 4
    assert registry.pup_gs.config.pipeline.model.scoring_downscale(684, 384) == 2
    assert registry.pup_gs.config.pipeline.model.scoring_downscale(128, 96) == 1
    vedal = registry.vedal_gs.config.pipeline.model
    assert vedal.scoring_downscale() == 1
    # The ablation measures importance for kl_weight's unit, and only for that: in 'loss' units it scores nothing.
    assert type(vedal)(vedal=VedalConfig(use_gate=False)).scoring_downscale() == 1
    assert type(vedal)(vedal=VedalConfig(use_gate=False, kl_weight_units="loss")).scoring_downscale() is None
    assert registry.splatfacto_portable.config.pipeline.model.scoring_downscale() is None


@dataclass
class HalfSizeFirstViewConfig(DefaultSceneDataParserConfig):
    """The built-in scene with its first training camera at half size (a dataset of mixed image sizes)."""

    _target: Type = field(default_factory=lambda: HalfSizeFirstView)


class HalfSizeFirstView(DefaultSceneDataParser):
    def _generate_dataparser_outputs(self, split="train", **kwargs):
        outputs = super()._generate_dataparser_outputs(split, **kwargs)
        if split == "train":
            outputs.cameras.rescale_output_resolution(torch.tensor([0.5] + [1.0] * (len(outputs.cameras) - 1))[:, None])
        return outputs


@pytest.mark.parametrize("method", ["pup-gs", "vedal-gs"])
def test_mixed_image_sizes_are_refused_at_setup_in_one_line(default_scene, tmp_path, capsys, method):
    config = trainer_config(method, default_scene, tmp_path / "out")
    config.pipeline.datamanager.dataparser = HalfSizeFirstViewConfig(data=default_scene)
    line = refusal_line(config, capsys)
    assert re.search(rf"error: {method} scores Gaussians on all training views at one image size, but this dataset "
                     r"mixes 2 sizes: 128x96 \(\d+ images\), 64x48 \(1 images\)", line), line


def test_scoring_downscale_without_pixels_is_refused_at_setup(default_scene, tmp_path, capsys):
    config = trainer_config("pup-gs", default_scene, tmp_path / "out")
    config.pipeline.model.fisher_downscale = 200
    config.pipeline.model.score_min_side = 0  # the floor would otherwise score at full resolution
    line = refusal_line(config, capsys)
    assert "1/200 of the 128x96 training images, which leaves no pixel" in line


def test_a_target_below_min_gaussians_is_refused_at_setup(default_scene, tmp_path, capsys):
    config = trainer_config("pup-gs", default_scene, tmp_path / "out")
    config.pipeline.model.schedule.target_gaussians = 10
    line = refusal_line(config, capsys)
    assert "--pipeline.model.target-gaussians 10 is below --pipeline.model.min-gaussians 64" in line


def test_a_target_not_below_the_gaussians_vedal_gs_fine_tunes_is_refused_at_setup(default_scene, tmp_path, capsys):
    config = trainer_config("vedal-gs", default_scene, tmp_path / "out")
    config.pipeline.model.vedal.finetune_start_step = 0  # fine-tuning from the first step: the count is known at setup
    config.pipeline.model.vedal.target_gaussians = 10**7
    line = refusal_line(config, capsys)
    assert re.search(r"error: the target of 10000000 Gaussians is not below the \d+ that vedal-gs would prune from", line), line


# -- progress ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def local_writer():
    """nerfstudio's terminal writer alone, restored afterwards (its state is module-global)."""
    saved_writers, saved_buffer = list(writer.EVENT_WRITERS), dict(writer.GLOBAL_BUFFER)
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()
    writer.setup_local_writer(LoggingConfig(steps_per_log=100, local_writer=LocalWriterConfig(enable=True, max_log_size=0)),
                              max_iter=10000)
    yield
    writer.EVENT_WRITERS[:] = saved_writers
    writer.EVENT_STORAGE.clear()
    writer.GLOBAL_BUFFER.clear()
    writer.GLOBAL_BUFFER.update(saved_buffer)


def progress_line(step, capsys, seconds_per_step=0.1):
    """Log one step as nerfstudio's trainer does and return the line the terminal writer prints for it."""
    capsys.readouterr()
    writer.put_time(writer.EventName.ITER_TRAIN_TIME, seconds_per_step, step=step, avg_over_steps=True, update_eta=True)
    writer.write_out_storage()
    writer.EVENT_STORAGE.clear()
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(step))][-1]


def test_post_hoc_run_shows_its_own_fraction_and_eta(local_writer, capsys):
    # nerfstudio alone: a run of 10000 steps loaded at step 30000 shows 305% and an ETA from a negative count.
    assert progress_line(30500, capsys).startswith("30500 (305.00%)")
    show_progress_of_this_run(first_step=30000, steps=10000)
    line = progress_line(30500, capsys)
    assert line.startswith("30500 (5.00%)")
    assert "15 m, 50 s" in line  # (40000 - 30500) steps x 0.1 s
    show_progress_of_this_run(first_step=30000, steps=10000)  # installing twice changes nothing
    assert progress_line(39900, capsys).startswith("39900 (99.00%)")


def test_a_run_from_step_zero_shows_what_nerfstudio_shows(local_writer, capsys):
    show_progress_of_this_run(first_step=0, steps=10000)
    line = progress_line(2500, capsys)
    assert line.startswith("2500 (25.00%)") and "12 m, 30 s" in line


def test_trainer_counts_progress_from_the_loaded_step(default_scene, tmp_path, local_writer):
    fresh = trainer_config("pup-gs", default_scene, tmp_path / "fresh", max_num_iterations=700)
    trainer = fresh.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert writer.GLOBAL_BUFFER["max_iter"] == 700
    trainer.save_checkpoint(299)

    checkpoint = next((tmp_path / "fresh").rglob("step-000000299.ckpt"))
    resumed = trainer_config("pup-gs", default_scene, tmp_path / "resumed", max_num_iterations=700,
                             load_checkpoint=checkpoint)
    trainer = resumed.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer._start_step == 300
    assert writer.GLOBAL_BUFFER["max_iter"] == 1000  # the ETA counts down to the run's end, step 999
