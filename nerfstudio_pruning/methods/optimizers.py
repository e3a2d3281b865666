"""The optimizers of the plugin's methods: splatfacto's table, the Adam that runs fused on the CPU, and moving
learning-rate schedules to a step."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig


@dataclass
class PortableAdamOptimizerConfig(AdamOptimizerConfig):
    """splatfacto's Adam, run by torch's fused kernel when the parameters are on the CPU.

    torch's default CPU Adam makes about ten passes over every parameter tensor per step; the fused kernel makes
    one, ~10x faster at splatfacto's sizes (188k Gaussians: 67 ms against 6 ms per step on one core), which is
    a large share of a CPU training step. The update is the same up to float rounding. On CUDA nothing changes.
    """

    def setup(self, params) -> torch.optim.Optimizer:
        params = list(params)
        kwargs = vars(self).copy()
        kwargs.pop("_target")
        kwargs.pop("max_norm")
        if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params):
            return FusedOnCpuAdam(params, fused=True, **kwargs)
        return self._target(params, **kwargs)


class FusedOnCpuAdam(torch.optim.Adam):
    """torch's Adam that stays fused when a checkpoint is loaded.

    `load_state_dict` copies every hyperparameter of the saved groups, `fused` included, so a checkpoint written
    by the unfused optimizer (stock splatfacto, or this plugin before it fused) would switch the kernel off for
    the rest of the run. The flag only chooses the kernel, never the update, so keeping ours is safe.
    """

    def load_state_dict(self, state_dict) -> None:
        fused = [group.get("fused") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, fused):
            group["fused"] = flag


def splatfacto_optimizers(max_steps: int) -> dict:
    """splatfacto 1.1.5's optimizer table, with the schedules stretched over `max_steps`.

    A copy, because the original lives in nerfstudio's method table (`nerfstudio.configs.method_configs`), whose
    import discovers the plugins, i.e. imports this module: reading it from here is a circular import.
    `tests/test_plugin_hygiene.py` checks that the copy still equals splatfacto's.
    """

    def adam(lr: float) -> AdamOptimizerConfig:
        return PortableAdamOptimizerConfig(lr=lr, eps=1e-15)

    return {
        "means": {"optimizer": adam(1.6e-4), "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps)},
        "features_dc": {"optimizer": adam(0.0025), "scheduler": None},
        "features_rest": {"optimizer": adam(0.0025 / 20), "scheduler": None},
        "opacities": {"optimizer": adam(0.05), "scheduler": None},
        "scales": {"optimizer": adam(0.005), "scheduler": None},
        "quats": {"optimizer": adam(0.001), "scheduler": None},
        "camera_opt": {
            "optimizer": adam(1e-4),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
        "bilateral_grid": {
            "optimizer": adam(2e-3),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
    }


def advance_schedulers(optimizers, step: int) -> None:
    """Set every learning-rate schedule to `step`, as after `step` training steps (a run starting mid-schedule)."""
    for scheduler in optimizers.schedulers.values():
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step was skipped here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
