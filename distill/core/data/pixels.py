"""Student pixels stored in the teacher cache (``cache_teacher --pixels SIZE``) and their way onto
the device.

Writer side: :func:`crop_pixels` turns a view image into the uint8 [S, S, 3] crop the student
sees (shortest side resized to S, bicubic, centre crop: the student's own eval transform without
the normalisation), :func:`encode_jpeg` stores it as JPEG bytes (``--pixel-format jpeg``).
Reader side: :func:`student_pixels` turns a batch of uint8 crops (or JPEG bytes, decoded in one
``torchvision.io.decode_jpeg`` call on the training device) into the normalised float input of the
student, resizing on the device when the student's input size differs from S. Views already fix
the flip, so nothing random is added here: a distilled sample is exactly what the teacher saw.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from distill.core.errors import ConfigError, PixelCacheError

PIXEL_FORMATS = ("raw", "jpeg")
PIXEL_MODES = ("auto", "cache", "decode")


@dataclass(frozen=True)
class PixelSettings:
    """``--pixels SIZE --pixel-format raw|jpeg --pixel-quality Q``."""

    size: int
    format: str = "raw"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--pixels must be a positive size, got {self.size}")
        if self.format not in PIXEL_FORMATS:
            raise ConfigError(f"--pixel-format must be one of {'|'.join(PIXEL_FORMATS)}, not {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--pixel-quality must be in 1..100, got {self.quality}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "format": self.format}
        if self.format == "jpeg":
            out["quality"] = self.quality
        return out


def crop_pixels(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: shortest side resized to ``size`` (bicubic), centre crop -- the same
    torchvision ops as the students' eval transform, so the crop equals its pre-normalisation input."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.resize(img.convert("RGB"), size, interpolation=InterpolationMode.BICUBIC)
    return np.array(TF.center_crop(img, size), dtype=np.uint8)


def encode_jpeg(crop: np.ndarray, quality: int) -> np.ndarray:
    """JPEG bytes (uint8 1-D) of a uint8 [H, W, 3] crop."""
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=quality)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def pack_jpeg(chunks: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-view JPEG bytes as (all bytes concatenated, uint8; [n, V, 2] int64 (start,
    length) of each view's bytes in them): the cache's ``image_jpeg`` / ``image_jpeg_index``."""
    lengths = np.array([[len(c) for c in views] for views in chunks], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths.ravel())[:-1]]).reshape(lengths.shape)
    data = np.concatenate([c for views in chunks for c in views]) if lengths.size else np.zeros(0, np.uint8)
    return data, np.stack([starts, lengths], axis=-1)


def decode_jpeg_batch(data: Tensor, lengths: Tensor, device: torch.device) -> Tensor:
    """Decode a batch of JPEGs given as concatenated bytes + lengths (CPU tensors) with one
    ``torchvision.io.decode_jpeg`` call on ``device`` (CUDA: nvjpeg); returns uint8 [B, 3, H, W]."""
    from torchvision.io import ImageReadMode, decode_jpeg

    parts = list(torch.split(data.cpu(), [int(n) for n in lengths.cpu()]))
    target = device if device.type == "cuda" else "cpu"
    with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(parts, mode=ImageReadMode.RGB, device=target)
    return torch.stack(images).to(device, non_blocking=True)


def normalise_pixels(x: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, 3, S, S] on the device -> float [B, 3, size, size] normalised with ``mean``/``std``
    (bicubic antialiased resize when S != size)."""
    x = x.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def student_pixels(batch: Any, student: Any, device: torch.device) -> Tensor:
    """The student's float input of a :class:`distill.pipeline.train.data.TrainBatch` already moved to
    ``device``: decoded (``float``) pixels pass through; ``raw`` uint8 [B, S, S, 3] crops and
    ``jpeg`` bytes are decoded/normalised on the device."""
    fmt = getattr(batch, "pixel_format", "float")
    if fmt == "float":
        return batch.pixels
    if fmt == "raw":
        x = batch.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
    elif fmt == "jpeg":
        x = decode_jpeg_batch(batch.pixels, batch.pixel_lengths, device)
    else:
        raise PixelCacheError(f"unknown pixel format {fmt!r}")
    return normalise_pixels(x, int(student.image_size), student.mean, student.std)
