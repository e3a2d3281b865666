"""`--pipeline.model.init-ply`: the Gaussians of a 3DGS PLY trained elsewhere, placed in the training data's frame.

The PLY must be in the frame `init_ply_frame` names. Both frames are tried on a few training images: one that
clearly matches them better than the chosen one is a wrong choice, refused with the flag to pass.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_pruning.errors import InputError
from nerfstudio_pruning.gaussians_ply import in_frame, read_gaussians_ply
from nerfstudio_pruning.render import rasterization
from nerfstudio_pruning.types import Gaussians

# The PLY's Gaussians are rendered on this many training views, at most this many pixels on the longer side, in
# both world frames; a frame better by the margin is the right one; below the low mark a warning.
PLY_CHECK_VIEWS = 4
PLY_CHECK_SIDE = 256
PLY_FRAME_MARGIN_DB = 3.0
PLY_LOW_PSNR_DB = 15.0


def gaussians_from_ply(pipeline, ply: Path) -> Tuple[Gaussians, float]:
    """The PLY's Gaussians in the frame the model's `init_ply_frame` names, and their PSNR on a few training views
    there; InputError when the other frame matches the training images clearly better."""
    model, outputs = pipeline.model, pipeline.datamanager.train_dataparser_outputs
    gaussians = read_gaussians_ply(ply, sh_degree=model.config.sh_degree)
    transform, scale = outputs.dataparser_transform, float(outputs.dataparser_scale)
    chosen = model.config.init_ply_frame
    frames = {"dataset": gaussians}
    identity = torch.allclose(transform[:3, :4].double().cpu(), torch.eye(4, dtype=torch.float64)[:3]) and scale == 1
    if chosen == "colmap" or not identity:
        frames["colmap"] = in_frame(gaussians, transform, scale)
    psnr = {frame: psnr_on_training_views(pipeline, g) for frame, g in frames.items()}
    best = max(psnr, key=psnr.get)
    if psnr[best] > psnr[chosen] + PLY_FRAME_MARGIN_DB:
        raise InputError(f"{ply} matches the training images at {psnr[chosen]:.1f} dB PSNR in the {chosen} frame and "
                         f"{psnr[best]:.1f} dB in the {best} frame: pass --pipeline.model.init-ply-frame {best}")
    if psnr[chosen] < PLY_LOW_PSNR_DB:
        CONSOLE.print(f"[yellow]{ply} matches the training images at only {psnr[chosen]:.1f} dB PSNR: is it this scene, "
                      "trained with these dataparser options?", soft_wrap=True)
    return frames[chosen], psnr[chosen]


@torch.no_grad()
def psnr_on_training_views(pipeline, gaussians: Gaussians) -> float:
    """PSNR of `gaussians` against a few training images spread over the dataset, composited on black, at most
    PLY_CHECK_SIDE pixels on the longer side."""
    from nerfstudio.models.splatfacto import resize_image

    from nerfstudio_pruning.methods.base import get_viewmat

    datamanager = pipeline.datamanager
    images, cameras = datamanager.cached_train, datamanager.train_dataset.cameras
    device = pipeline.model.device
    g = gaussians
    picks = sorted({int(i) for i in np.linspace(0, len(cameras) - 1, min(PLY_CHECK_VIEWS, len(cameras))).round()})
    errors = []
    for i in picks:
        camera = copy.deepcopy(cameras[i:i + 1])
        factor = max(1, math.ceil(max(int(camera.width), int(camera.height)) / PLY_CHECK_SIDE))
        camera.rescale_output_resolution(1.0 / factor)
        image = images[i]["image"]
        image = (image.float() / 255.0 if image.dtype == torch.uint8 else image.float()).to(device)
        if image.shape[-1] == 4:
            image = image[..., :3] * image[..., 3:]
        image = resize_image(image, factor) if factor > 1 else image
        rendered, _, _ = rasterization(
            means=g.means.to(device), quats=g.quats.to(device), scales=g.scales.to(device),
            opacities=g.opacities.to(device), colors=g.sh.to(device), sh_degree=g.sh_degree,
            viewmats=get_viewmat(camera.camera_to_worlds).to(device), Ks=camera.get_intrinsics_matrices().to(device),
            width=int(camera.width), height=int(camera.height))
        rendered = rendered[0].clamp(0, 1)
        if rendered.shape != image.shape:
            raise RuntimeError(f"rendered {tuple(rendered.shape)}, image {tuple(image.shape)}")
        errors.append(float(((rendered - image) ** 2).mean()))
    return -10.0 * math.log10(max(sum(errors) / len(errors), 1e-10))
