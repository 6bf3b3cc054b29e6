"""The views the cache stores per image: deterministic view and mixup parameters of every image
(independent of sharding, ranks and workers), the :class:`ViewImages` dataset that decodes an
image into its views (teacher inputs, and the student crops when pixels are cached) and the arrays
of view parameters and pixels a shard stores besides the teacher outputs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from distill.core.cache.encode import Arrays
from distill.core.cache.schema import JPEG, JPEG_INDEX, PIXELS, VIEW_MIX, VIEW_PARTNER
from distill.core.data.augment import sample_view_params
from distill.core.data.dataset import ImageTextDataset
from distill.core.data.mixup import NO_MIX, sample_mix_params, view_image
from distill.core.data.pixels import crop_pixels, encode_jpeg, pack_jpeg
from distill.core.errors import BadSampleError
from distill.pipeline.cache.settings import CacheSettings


def image_view_params(index: int, settings: CacheSettings) -> np.ndarray:
    """[V, 5] view parameters of a global image index; independent of sharding and ranks."""
    rng = np.random.default_rng([settings.view_seed, index])
    return sample_view_params(rng, settings.total_views, tuple(settings.view_scale))


def image_mix_params(index: int, settings: CacheSettings, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(partner [V] int64, mix [V, 6] float32) of a global image index (see :mod:`distill.core.data.mixup`):
    -1 / :data:`NO_MIX` for the plain views; independent of sharding and ranks."""
    partner = np.full(settings.total_views, -1, dtype=np.int64)
    mix = np.tile(NO_MIX, (settings.total_views, 1))
    if settings.mixup_views:
        rng = np.random.default_rng([settings.view_seed, index, 1])
        partner[settings.views:], mix[settings.views:] = sample_mix_params(
            rng, index, num_images, settings.mixup_views, settings.mixup_alpha, tuple(settings.view_scale))
    return partner, mix


class ViewImages(Dataset):
    """Decodes image i and returns (i, [V, 3, H, W] teacher inputs, [V, 5] params, error or None,
    extras: mixup partner/mix params and the student pixels of each view when cached)."""

    def __init__(self, ds: ImageTextDataset, transform: Callable[[Image.Image], Tensor], settings: CacheSettings) -> None:
        self.ds, self.transform, self.settings = ds, transform, settings

    def __len__(self) -> int:
        return self.ds.num_images

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, np.ndarray, str | None, dict[str, Any]]:
        params = image_view_params(i, self.settings)
        partner, mix = image_mix_params(i, self.settings, self.ds.num_images)
        extra: dict[str, Any] = {"partner": partner, "mix": mix}
        load = functools.lru_cache(maxsize=4)(self.ds.load_image)
        try:
            views = [view_image(load, i, p, int(j), m) for p, j, m in zip(params, partner, mix)]
        except BadSampleError as e:
            return i, None, params, str(e), extra
        px = self.settings.pixels
        if px is not None:
            crops = [crop_pixels(v, px.size) for v in views]
            extra["pixels"] = np.stack(crops) if px.format == "raw" else [encode_jpeg(c, px.quality) for c in crops]
        return i, torch.stack([self.transform(v) for v in views]), params, None, extra


def collate_views(items: list[tuple[int, Tensor | None, np.ndarray, str | None, dict[str, Any]]]
                  ) -> tuple[list[int], Tensor | None, np.ndarray, str | None, dict[str, Any]]:
    """Batch of :class:`ViewImages` items: (indices, [n, V, 3, H, W] pixels or None when an image
    failed, [n, V, 5] params, the first error or None, extras stacked (JPEG bytes as lists))."""
    errors = [it[3] for it in items if it[3]]
    pixels = None if errors else torch.stack([it[1] for it in items])
    extra: dict[str, Any] = {}
    for key in items[0][4]:
        values = [it[4].get(key) for it in items]
        extra[key] = values if isinstance(values[0], list) or any(v is None for v in values) else np.stack(values)
    return [it[0] for it in items], pixels, np.stack([it[2] for it in items]), (errors[0] if errors else None), extra


def view_extra_arrays(extra: dict[str, Any], settings: CacheSettings, jpeg: list[list[np.ndarray]]) -> Arrays:
    """Per-batch arrays besides the teacher outputs: mixup parameters (``view_params_partner``,
    ``view_params_mix``) and raw student pixels (``image_pixels`` [n, V, S, S, 3] uint8); JPEG bytes
    are collected into ``jpeg`` and packed per shard."""
    out: Arrays = {}
    if settings.mixup_views:
        out[VIEW_PARTNER] = np.asarray(extra["partner"], dtype=np.int64)
        out[VIEW_MIX] = np.asarray(extra["mix"], dtype=np.float32)
    if settings.pixels is not None:
        if settings.pixels.format == "raw":
            out[PIXELS] = np.asarray(extra["pixels"], dtype=np.uint8)
        else:
            jpeg.extend(extra["pixels"])
    return out


def jpeg_arrays(chunks: list[list[np.ndarray]]) -> Arrays:
    """The JPEG arrays of a shard (``--pixel-format jpeg``): all bytes and the [n, V, 2] (start,
    length) index into them."""
    data, index = pack_jpeg(chunks)
    return {JPEG: data, JPEG_INDEX: index}
