"""The checks that turn the usual ways a run goes wrong into one clear line (`InputError`, exit status 1) before
anything is loaded, trained or overwritten.

`PruningTrainer` runs them: a missing data path, no training images or one without pixels, training images of
several sizes for a method that scores Gaussians on them (pup-gs, vedal-gs; found at the first scoring, thousands
of steps in, otherwise), a scoring downscale that leaves no pixel, a dataset without seed points, a checkpoint
that holds no Gaussians, an empty model, or one trained on another scene; a PLY for `--pipeline.model.init-ply`
that is not a usable 3DGS PLY of the configured SH degree (checked before ns-train writes its config.yml), or
one that fits the training images better in the other world frame (`init_ply.py`); a target size below
min-gaussians or not below a loaded model's count. `reported_in_one_line` prints such an error as one line and
exits with status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.errors import InputError, PruningRefused
from nerfstudio_pruning.gaussians_ply import read_gaussians_ply


@contextlib.contextmanager
def reported_in_one_line(on_error=None) -> Iterator[None]:
    """Our refusals (`InputError`, `PruningRefused`) raised inside as one red line and exit status 1, after
    `on_error()`."""
    try:
        yield
    except (InputError, PruningRefused) as err:
        if on_error is not None:
            on_error()
        CONSOLE.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(1) from None


def check_data_path(data: Optional[Path], generated: bool) -> None:
    """InputError for a data path that does not exist, unless the dataparser generates its scene there."""
    if data is not None and not Path(data).exists() and not generated:
        raise InputError(f"data path {data} does not exist")


def check_training_views(cameras, scoring_downscale: Union[None, float, Callable[[int, int], Optional[float]]],
                         method: str) -> None:
    """InputError unless there are training views, each with pixels, and, for a method that scores Gaussians on
    them (`scoring_downscale` not None), they share one size that keeps a pixel at 1/scoring_downscale.

    The scores render all training views as one batch of one image size (`Views`); without this check a scene
    of mixed sizes would train for thousands of steps and then fail at the first scoring.
    """
    widths = [int(w) for w in cameras.width.reshape(-1).tolist()]
    heights = [int(h) for h in cameras.height.reshape(-1).tolist()]
    if not widths:
        raise InputError("the dataset has no training images")
    empty = [i for i, (w, h) in enumerate(zip(widths, heights)) if w < 1 or h < 1]
    if empty:
        raise InputError(f"{len(empty)} training image(s) have no pixels (the first, #{empty[0]}, is "
                         f"{widths[empty[0]]}x{heights[empty[0]]}); remove them from the dataset")
    if scoring_downscale is None:
        return
    sizes = Counter(zip(widths, heights))
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h} ({n} images)" for (w, h), n in sizes.most_common(4))
        raise InputError(f"{method} scores Gaussians on all training views at one image size, but this dataset mixes "
                         f"{len(sizes)} sizes: {listed}{', ...' if len(sizes) > 4 else ''}; resize the images to one size")
    (width, height), = sizes
    if callable(scoring_downscale):
        scoring_downscale = scoring_downscale(width, height)
    if int(width / scoring_downscale) < 1 or int(height / scoring_downscale) < 1:
        raise InputError(f"{method} scores at 1/{scoring_downscale} of the {width}x{height} training images, which "
                         "leaves no pixel; choose a smaller scoring downscale")


def check_init_ply(config: TrainerConfig, read: bool = True) -> None:
    """InputError unless no checkpoint is asked for besides the model's init_ply (if any), and (`read`) the file is a
    usable 3DGS PLY of the configured SH degree. Reading checks every value: NaNs anywhere are refused."""
    model_config = config.pipeline.model
    ply = getattr(model_config, "init_ply", None)
    if ply is None:
        return
    if config.load_dir is not None or config.load_checkpoint is not None:
        raise InputError("--pipeline.model.init-ply and a checkpoint (--load-dir or --load-checkpoint) both give the "
                         "Gaussians to start from; pass one of them")
    if read:
        read_gaussians_ply(ply, sh_degree=model_config.sh_degree)


def checkpoint_to_load(config: TrainerConfig) -> Optional[Path]:
    """The checkpoint file `--load-dir`/`--load-step` or `--load-checkpoint` point at (as nerfstudio resolves them)."""
    if config.load_dir is not None:
        load_dir = Path(config.load_dir)
        if not load_dir.is_dir():
            raise InputError(f"--load-dir {load_dir} is not a folder")
        step = config.load_step
        if step is None:
            steps = sorted(int(name[name.find("-") + 1:name.find(".")]) for name in os.listdir(load_dir)
                           if name.startswith("step-") and name.endswith(".ckpt"))
            if not steps:
                raise InputError(f"--load-dir {load_dir} holds no step-*.ckpt checkpoints")
            step = steps[-1]
        return load_dir / f"step-{step:09d}.ckpt"
    if config.load_checkpoint is not None:
        return Path(config.load_checkpoint)
    return None


def check_same_scene(path: Path, dataparser_outputs) -> None:
    """Gaussians live in the frame the dataparser normalised the poses into: a checkpoint made with another
    transform or scale (another scene, or the same capture with other dataparser options) would not line up
    with these images. The checkpoint's run folder records its frame in dataparser_transforms.json."""
    recorded = path.parent.parent / "dataparser_transforms.json"
    if not recorded.exists():
        CONSOLE.print(f"[yellow]cannot check that {path.name} belongs to this scene: no {recorded.name} beside "
                      "its run folder", soft_wrap=True)
        return
    theirs = json.loads(recorded.read_text())
    ours_transform = dataparser_outputs.dataparser_transform.detach().cpu().numpy()
    their_transform = np.asarray(theirs["transform"], dtype=np.float64)
    their_scale, our_scale = float(theirs["scale"]), float(dataparser_outputs.dataparser_scale)
    same = (their_transform.shape == ours_transform.shape and np.allclose(their_transform, ours_transform, atol=1e-4)
            and abs(their_scale - our_scale) <= 1e-4 * max(abs(our_scale), 1e-12))
    if not same:
        raise InputError(
            f"{path} was trained on another scene or with other dataparser settings: its poses were normalised with "
            f"scale {their_scale:.6g}, this data's with {our_scale:.6g} (transforms differ too: "
            f"{not np.allclose(their_transform, ours_transform, atol=1e-4)}); its Gaussians would not line up "
            "with these images"
        )


def check_model_to_train_from_scratch(model, data_path: Optional[Path]) -> None:
    """InputError for a model that would start from random Gaussians without being asked to (a dataset without
    seed points), or from none."""
    seeds = getattr(model, "seed_points", None)
    if not getattr(model.config, "random_init", True) and (seeds is None or seeds[0].shape[0] == 0):
        raise InputError(
            f"the dataset at {data_path} has no seed points (no point cloud, or load_3D_points is off), so splatfacto "
            "would start from random Gaussians; pass --pipeline.model.random-init True to do that on purpose"
        )
    if model.num_points == 0:
        raise InputError("the model has no Gaussians to train")


def check_target(model, first_step: int, method: str) -> None:
    """A target size (pup-gs, vedal-gs) below min-gaussians, or not below the Gaussians it would be taken
    from where the model knows that count before training (`target_before_training`)."""
    target, minimum = model.config.gaussian_count_limits()
    if target is not None and target < minimum:
        raise InputError(f"--pipeline.model.target-gaussians {target} is below --pipeline.model.min-gaussians {minimum}")
    known = getattr(model, "target_before_training", lambda step: None)(first_step)
    if known is None:
        return
    wanted, present = known
    if wanted >= present:
        raise InputError(f"the target of {wanted} Gaussians is not below the {present} that {method} "
                         "would prune from; it would remove nothing")
    if wanted < minimum:
        raise InputError(f"the target of {wanted} Gaussians (of {present}) is below --pipeline.model.min-gaussians "
                         f"{minimum}")
