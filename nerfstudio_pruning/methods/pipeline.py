"""nerfstudio's VanillaPipeline, with checkpoints that resume a run exactly where it stopped.

A nerfstudio checkpoint holds the model and the optimizers but not what decides the next steps' randomness: the
order in which the datamanager visits training views, and the random generators that draw splatfacto's random
backgrounds, densification's split samples and VEDAL's Binary Concrete masks. A resumed run therefore trains on
a different sequence than the uninterrupted one would have, densifies differently and ends with a different
number of Gaussians. This pipeline saves that state with the checkpoint (in the pipeline's `_extra_state`, which
stock nerfstudio ignores) and restores it on load, so that on the same device a resumed run follows the
uninterrupted one step for step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, Type

import numpy as np
import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig


@dataclass
class PruningPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline whose checkpoints also carry the sampling and random-generator state (exact resume)."""

    _target: Type = field(default_factory=lambda: PruningPipeline)


def _python_rng_state(state: tuple) -> Dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _python_rng_tuple(saved: Dict[str, Any]) -> tuple:
    return (int(saved["version"]), tuple(int(v) for v in saved["internal"].tolist()), saved["gauss_next"])


def random_generator_state() -> Dict[str, Any]:
    """The process-wide generators: Python's `random`, numpy's legacy global one, torch's CPU and CUDA ones.
    Kept in tensors and plain numbers so that checkpoints load with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _python_rng_state(random.getstate()),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_generator_state(state: Dict[str, Any]) -> None:
    random.setstate(_python_rng_tuple(state["python"]))
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    # A checkpoint written on another device kind restores what both have; CUDA streams start fresh.
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed_random_generators(seed: int, camera_order_seed: int, datamanager: Any) -> None:
    """The random state a fresh run with these seeds starts from: nerfstudio's train.py seeds Python, numpy and
    torch with --machine.seed, and FullImageDatamanager shuffles its training views in passes with a generator of
    its own, seeded with its train_cameras_sampling_seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if hasattr(datamanager, "train_unseen_cameras") and hasattr(datamanager, "random_generator"):
        datamanager.random_generator = random.Random(camera_order_seed)
        datamanager.train_unseen_cameras = datamanager.sample_train_cameras()


class PruningPipeline(VanillaPipeline):
    config: PruningPipelineConfig

    def get_extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"random_generators": random_generator_state()}
        datamanager = self.datamanager
        if hasattr(datamanager, "train_unseen_cameras"):
            # FullImageDatamanager visits views in shuffled passes: the rest of the current pass and the shuffler.
            state["train_unseen_cameras"] = [int(i) for i in datamanager.train_unseen_cameras]
            shuffler = getattr(datamanager, "random_generator", None)
            if shuffler is not None:
                state["train_camera_shuffler"] = _python_rng_state(shuffler.getstate())
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        restore_random_generator_state(state["random_generators"])
        datamanager = self.datamanager
        unseen = state.get("train_unseen_cameras")
        if unseen is not None and hasattr(datamanager, "train_unseen_cameras"):
            n_train = len(datamanager.train_dataset)
            if all(0 <= i < n_train for i in unseen):
                datamanager.train_unseen_cameras = list(unseen)
        shuffler = state.get("train_camera_shuffler")
        if shuffler is not None and getattr(datamanager, "random_generator", None) is not None:
            datamanager.random_generator.setstate(_python_rng_tuple(shuffler))
