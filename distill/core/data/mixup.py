"""Mixup views for consistent ("function matching") distillation.

A mixup view of image ``i`` blends its own crop (the view's ``view_params``) with a crop of a
partner image ``j``: ``mixed = lam * view_i + (1 - lam) * view_j`` in uint8 RGB (PIL ``Image.blend``,
the partner crop resized to the size of the own crop). Partner, partner crop and ``lam`` are drawn
once per (image, view) from a seed and stored in the cache (``view_params_partner`` [n, V] int64,
-1 for plain views; ``view_params_mix`` [n, V, 6] float32 = (lam, top, left, height, width, flip)
of the partner crop), so the teacher's cached outputs and the student's input are built from the
same pixels by :func:`view_image`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from distill.core.errors import ConfigError
from distill.core.data.augment import IDENTITY, apply_view, sample_view_params

#: ``view_params_mix`` row of a plain (non-mixup) view: lam 1, identity partner crop.
NO_MIX = np.concatenate([[1.0], IDENTITY]).astype(np.float32)


def sample_mix_params(rng: np.random.Generator, index: int, num_images: int, count: int, alpha: float,
                      scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(partner [count] int64, mix [count, 6] float32) of ``count`` mixup views of image ``index``.

    The partner is any other image (the image itself when it is the only one), its crop a random
    resized crop + flip like the extra views, and ``lam ~ Beta(alpha, alpha)`` folded to ``>= 0.5``
    so that image ``index`` dominates its own mixup views."""
    if alpha <= 0:
        raise ConfigError(f"mixup alpha must be > 0, got {alpha}")
    partner = np.empty(count, dtype=np.int64)
    mix = np.empty((count, 6), dtype=np.float32)
    for m in range(count):
        j = int(rng.integers(num_images - 1)) if num_images > 1 else index
        partner[m] = j + (num_images > 1 and j >= index)
        lam = float(rng.beta(alpha, alpha))
        mix[m, 0] = max(lam, 1.0 - lam)
        mix[m, 1:] = sample_view_params(rng, 2, scale)[1]
    return partner, mix


def mix_images(own: Image.Image, other: Image.Image, lam: float) -> Image.Image:
    """``lam * own + (1 - lam) * other`` in uint8 RGB; ``other`` is resized (bicubic) to ``own``'s size."""
    own, other = own.convert("RGB"), other.convert("RGB")
    if other.size != own.size:
        other = other.resize(own.size, Image.Resampling.BICUBIC)
    return Image.blend(other, own, float(lam))


def view_image(load_image: Callable[[int], Image.Image], index: int, params: np.ndarray, partner: int = -1,
               mix: np.ndarray | None = None) -> Image.Image:
    """The image a cached view shows: image ``index`` cropped by ``params`` and, for a mixup view
    (``partner >= 0``), blended with the partner's crop ``mix[1:]`` at weight ``mix[0]``."""
    img = apply_view(load_image(index), params)
    if partner < 0:
        return img
    assert mix is not None
    return mix_images(img, apply_view(load_image(int(partner)), mix[1:]), float(mix[0]))
