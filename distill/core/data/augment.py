"""Reproducible image views: each view is (top, left, height, width, flip) as fractions of the
source image, so the teacher's cached view can be rebuilt exactly for the student."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

IDENTITY = np.array([0.0, 0.0, 1.0, 1.0, 0.0], dtype=np.float32)


def sample_view_params(rng: np.random.Generator, n_views: int, scale: tuple[float, float] = (0.5, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> np.ndarray:
    """[n_views, 5] float32 view parameters; view 0 is always the identity (clean) view."""
    out = np.tile(IDENTITY, (n_views, 1))
    for v in range(1, n_views):
        area = rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h = min(1.0, math.sqrt(area / r))
        w = min(1.0, math.sqrt(area * r))
        out[v] = [rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w, float(flip and rng.random() < 0.5)]
    return out


def apply_view(img: Image.Image, params: np.ndarray) -> Image.Image:
    """Crop (fractions of the source size) and optionally mirror ``img``."""
    top, left, h, w, flip = (float(x) for x in params)
    if (top, left, h, w) != (0.0, 0.0, 1.0, 1.0):
        W, H = img.size
        box = (round(left * W), round(top * H), round((left + w) * W), round((top + h) * H))
        img = img.crop(box)
    if flip >= 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img
