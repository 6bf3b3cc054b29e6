"""Running the teacher for the cache: its features of view batches and captions (fp16 autocast on
CUDA with ``--amp``), the probe that refuses settings the teacher cannot serve before anything is
written, and ``--verify``: recompute random samples and compare them with the cache
(:func:`distill.core.cache.verify.verify_outputs` does the comparing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from distill.core.cache.reader import TeacherCache
from distill.core.cache.verify import THRESHOLD, verify_outputs
from distill.core.data.dataset import ImageTextDataset
from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures
from distill.pipeline.cache.settings import CacheSettings
from teachers import Teacher


def teacher_device(teacher: Teacher) -> torch.device:
    return next(iter(teacher.parameters()), torch.empty(0)).device


def encode_views(teacher: Teacher, pixels: Tensor, layers: Sequence[int] = (), amp: bool = False) -> ImageFeatures:
    """Features of [n, V, 3, H, W] teacher inputs, rows flattened image-major to n * V."""
    device = teacher_device(teacher)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        return teacher.encode_image(pixels.flatten(0, 1).to(device), layers=layers)


def encode_captions(teacher: Teacher, captions: Sequence[str], layers: Sequence[int] = (), amp: bool = False) -> TextFeatures:
    """Features of tokenised captions."""
    device = teacher_device(teacher)
    batch = {k: v.to(device) for k, v in teacher.tokenize(list(captions)).items()}
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        return teacher.encode_text(batch, layers=layers)


def _first_bad_layer(run: Callable[[int], Any], bad: int) -> int:
    """Smallest layer index in [0, bad] that ``run`` rejects (``bad`` is known to fail): the depth."""
    lo, hi = 0, bad
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            run(mid)
            lo = mid + 1
        except (IndexError, ValueError, KeyError, RuntimeError):
            hi = mid
    return lo


def probe_teacher(teacher: Teacher, settings: CacheSettings) -> None:
    """One forward on a blank image and a short caption: refuse (:class:`ConfigError`) intermediate
    layers beyond a tower's depth, naming the valid range, and a ``grid:<g>`` larger than the
    teacher's token grid (pooling would upsample); refuse (``ValueError``) token storage for a
    teacher that returns no tokens."""
    device = teacher_device(teacher)
    pixels = teacher.image_transform()(Image.new("RGB", (teacher.image_size, teacher.image_size)))[None].to(device)
    text = {k: v.to(device) for k, v in teacher.tokenize(["a photo"]).items()}
    towers = {"image": lambda i: teacher.encode_image(pixels, layers=[i]),
              "text": lambda i: teacher.encode_text(text, layers=[i])}
    with torch.inference_mode():
        for tower, layers in (("image", settings.image_layers), ("text", settings.text_layers)):
            for i in sorted(layers, reverse=True):
                try:
                    towers[tower](i)
                except (IndexError, ValueError, KeyError, RuntimeError) as e:
                    depth = _first_bad_layer(towers[tower], i)
                    valid = f"{tower}.0 .. {tower}.{depth - 1}" if depth else "none"
                    raise ConfigError(f"--layers {tower}.{i}: the teacher's {tower} tower has {depth} layers "
                                      f"(valid: {valid}); {type(e).__name__}: {e}") from e
        mode = settings.image_tokens
        if mode.kind != "none":
            image = teacher.encode_image(pixels)
            if image.tokens is None:
                raise ConfigError(f"teacher {teacher.spec} returns no image tokens; use --image-tokens none")
            if mode.kind == "grid" and image.grid and mode.k > min(image.grid):
                raise ConfigError(f"--image-tokens grid:{mode.k} is larger than the teacher's {image.grid[0]}x"
                                  f"{image.grid[1]} token grid; pooling cannot add tokens. Use grid:<g> with "
                                  f"g <= {min(image.grid)} or full")
        if settings.text_tokens.kind != "none" and teacher.encode_text(text).tokens is None:
            raise ConfigError(f"teacher {teacher.spec} returns no text tokens; use --text-tokens none")


def verify_cache(out: Path, teacher: Teacher, ds: ImageTextDataset, n: int, seed: int = 0,
                 threshold: float = THRESHOLD) -> dict[str, float]:
    """Recompute ``n`` random images (all views) and their captions with the teacher and compare
    them with the cache in ``out`` (:func:`distill.core.cache.verify.verify_outputs`: cosine >=
    ``threshold``; raises :class:`CacheVerifyError`); returns the minimum cosines."""
    transform = teacher.image_transform()

    def images(views: list[Image.Image]) -> ImageFeatures:
        return encode_views(teacher, torch.stack([transform(img) for img in views])[None])

    return verify_outputs(TeacherCache(out), ds, images, lambda captions: encode_captions(teacher, captions), n, seed,
                          threshold)
