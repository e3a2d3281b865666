"""gsplat 1.4.0's rasterization constants, defined once for every backend and score.

Read from `gsplat/cuda/csrc/rasterize_to_pixels_fwd.cu`, `isect_tiles.cu` and `gsplat.rendering.rasterization`'s
defaults. The compiled CPU kernels compare float32 values with the float32 copies below, because the torch
reference compares float32 tensors with Python scalars, which torch rounds to float32 first.
"""

from __future__ import annotations

import math

import numpy as np

# gsplat 1.4.0 clamps alpha at 0.999. The PUP paper's notation uses 0.99 (the original 3DGS kernel); we follow the
# library the models are trained with.
ALPHA_MAX = 0.999
# Pairs with alpha < 1/255 are skipped (and contribute nothing to the transmittance).
ALPHA_MIN_RECIPROCAL = 255.0
ALPHA_MIN = 1.0 / ALPHA_MIN_RECIPROCAL
# A pixel stops before the pair that would bring its transmittance to this or below (that pair is excluded).
TRANSMITTANCE_MIN = 1e-4
LOG_TRANSMITTANCE_MIN = math.log(TRANSMITTANCE_MIN)
# Each composited pair takes at least 1/255 of the transmittance, and the pixel stops before T reaches 1e-4.
MAX_PAIRS_PER_PIXEL = math.ceil(math.log(TRANSMITTANCE_MIN) / math.log(1.0 - ALPHA_MIN))

ALPHA_MAX_F32 = np.float32(ALPHA_MAX)
ALPHA_MIN_F32 = np.float32(ALPHA_MIN)

# `rasterization()`'s defaults: tile edge in pixels, 2D covariance dilation, clipping planes.
TILE_SIZE = 16
EPS2D = 0.3
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
