"""Checkpoint compatibility: what a splatfacto-family checkpoint must hold, and what keeps checkpoints loadable
with `torch.load(weights_only=True)` (ns-eval, ns-export and ns-viewer under torch >= 2.6)."""

from __future__ import annotations

import contextlib
from typing import Any, Dict

import numpy as np
import torch
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.models.splatfacto import num_sh_bases

from nerfstudio_pruning.errors import InputError


def check_gaussian_checkpoint(state: Dict[str, Any], sh_degree: int) -> int:
    """Number of Gaussians in a model state dict; `InputError` when it cannot load into a splatfacto model of
    `sh_degree` (another kind of method, no Gaussians, another SH degree)."""
    prefix = "gauss_params." if "gauss_params.means" in state else ""
    if f"{prefix}means" not in state:
        raise InputError("the checkpoint holds no Gaussians (not a splatfacto-family method); "
                         "these methods load checkpoints of splatfacto, splatfacto-portable, pup-gs and vedal-gs")
    n = int(state[f"{prefix}means"].shape[0])
    if n == 0:
        raise InputError("the checkpoint holds an empty model (0 Gaussians); there is nothing to train or prune")
    rest = state.get(f"{prefix}features_rest")
    if rest is not None and rest.dim() == 3 and rest.shape[1] != num_sh_bases(sh_degree) - 1:
        degree = round((rest.shape[1] + 1) ** 0.5) - 1
        raise InputError(f"the checkpoint's Gaussians have SH degree {degree} (features_rest {tuple(rest.shape)}), this "
                         f"config has sh_degree {sh_degree}: pass --pipeline.model.sh-degree {degree}")
    return n


def use_python_float_learning_rates(optimizers: Optimizers) -> None:
    """Keep learning rates Python floats so checkpoints load with `torch.load(weights_only=True)`.

    nerfstudio's exponential-decay schedule computes rates with numpy; the numpy scalars end up in the saved
    optimizer and scheduler state, and torch >= 2.6 (weights_only by default) then refuses the checkpoint in
    ns-eval, ns-export and ns-viewer.
    """
    for scheduler in optimizers.schedulers.values():
        # Marked on the functions, not the scheduler: a scheduler's attributes are saved and restored with
        # checkpoints, its lambdas are not, so a resumed run must wrap them again.
        if all(getattr(f, "returns_python_float", False) for f in scheduler.lr_lambdas):
            continue
        scheduler.lr_lambdas = [_python_float_schedule(f) for f in scheduler.lr_lambdas]
        scheduler._last_lr = [float(lr) for lr in scheduler._last_lr]
    for optimizer in optimizers.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])


def _python_float_schedule(schedule):
    def wrapped(step):
        return float(schedule(step))

    wrapped.returns_python_float = True
    return wrapped


def _numpy_scalar_reconstructor():
    # numpy 2 moved `numpy.core` to `numpy._core` (the old name still imports, with a deprecation warning).
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        from numpy._core.multiarray import scalar
    else:
        from numpy.core.multiarray import scalar
    return scalar


@contextlib.contextmanager
def numpy_scalars_allowed():
    """Let `torch.load(weights_only=True)` read the numpy scalars in checkpoints written by stock nerfstudio.

    Stock splatfacto checkpoints hold numpy learning rates, which torch >= 2.6 refuses by default. Allowing
    numpy's scalar and dtype reconstructors admits plain numbers, not arbitrary objects.
    """
    allowed = [_numpy_scalar_reconstructor(), np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
    with torch.serialization.safe_globals(allowed):
        yield
