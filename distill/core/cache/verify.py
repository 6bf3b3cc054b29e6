"""Verification of a teacher cache.

Integrity: :func:`check_file` checks one file against its ``{bytes, sha256}`` record (existence,
size, sha256), the checks behind :class:`~distill.core.cache.reader.TeacherCache`'s ``verify``
modes and the writer's resume. Content: :func:`verify_outputs` recomputes random samples (every
view, every caption) and compares them with the cached features by cosine similarity, and
:func:`verify_pixels` compares cached student pixels with the rebuilt crops. Nothing here runs a
teacher: the caller passes functions that turn view images / captions into features.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from distill.core.data.mixup import view_image
from distill.core.data.pixels import crop_pixels, decode_jpeg_batch, encode_jpeg
from distill.core.errors import CacheCorruptError, CacheVerifyError
from distill.core.features import ImageFeatures, TextFeatures

#: Cosine a recomputed output must reach: embeddings and fp16 tokens / int8 tokens.
THRESHOLD = 0.999
INT8_THRESHOLD = 0.99


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, entry: dict[str, Any], verify: str) -> None:
    """Check one cache file against its ``{bytes, sha256}`` record (``verify``: none|size|lazy|full;
    ``lazy`` checks the size here and the sha256 on first read, see ``TeacherCache._gather``)."""
    if not path.is_file():
        raise CacheCorruptError(f"missing cache file {path}")
    if verify in ("size", "lazy", "full") and path.stat().st_size != entry["bytes"]:
        raise CacheCorruptError(f"{path}: size {path.stat().st_size} bytes, expected {entry['bytes']} (truncated or overwritten)")
    if verify == "full" and sha256_file(path) != entry["sha256"]:
        raise CacheCorruptError(f"{path}: sha256 mismatch (the file is corrupt)")


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two [B, ...] tensors (float64, rows flattened)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12)


class OutputComparison:
    """Compares cached with recomputed features; :attr:`worst` holds the minimum cosine per output."""

    def __init__(self, path: Path, threshold: float = THRESHOLD, token_threshold: float = THRESHOLD) -> None:
        self.path, self.threshold, self.token_threshold = path, threshold, token_threshold
        self.worst: dict[str, float] = {}

    def compare(self, what: str, cached: Tensor, fresh: Tensor, thr: float, names: list[str]) -> None:
        """Raise :class:`CacheVerifyError` naming the worst row (a NaN row first) below ``thr``."""
        cos = cosines(cached, fresh.float().cpu())
        self.worst[what] = float(cos.min())  # NaN when any row is NaN
        bad = torch.nonzero(~(cos >= thr)).flatten()  # NaN compares False: a failure
        if len(bad):
            k = int(bad[cos[bad].nan_to_num(-2.0).argmin()])  # a NaN row first, else the worst
            raise CacheVerifyError(f"{self.path}: cached {what} of {names[k]} differs from the teacher's output "
                                   f"(cosine {cos[k]:.5f} < {thr}); the cache is stale or corrupt")

    def images(self, cached: ImageFeatures, fresh: ImageFeatures, names: list[str], tokens: bool) -> None:
        """The embeddings and, with ``tokens``, the token features of image views."""
        self.compare("image embed", cached.embed, fresh.embed, self.threshold, names)
        if tokens:
            self.compare("image tokens", cached.tokens, fresh.tokens, self.token_threshold, names)

    def texts(self, cached: TextFeatures, fresh: TextFeatures, names: list[str], tokens: bool) -> None:
        """The embeddings and, with ``tokens``, the token features (padding zeroed) of captions."""
        self.compare("text embed", cached.embed, fresh.embed, self.threshold, names)
        if tokens:
            mask = fresh.mask.cpu() if fresh.mask is not None else torch.ones(fresh.tokens.shape[:2], dtype=torch.bool)
            recomputed = fresh.tokens.float().cpu() * mask.unsqueeze(-1)
            width = recomputed.shape[1]
            stored = cached.tokens[:, :width] * cached.mask[:, :width].unsqueeze(-1)
            self.compare("text tokens", stored, recomputed, self.token_threshold, names)


def verify_outputs(cache: Any, dataset: Any, encode_images: Callable[[list[Image.Image]], ImageFeatures],
                   encode_texts: Callable[[list[str]], TextFeatures], n: int, seed: int = 0,
                   threshold: float = THRESHOLD) -> dict[str, float]:
    """Recompute ``n`` random images of ``cache`` (a :class:`~distill.core.cache.reader.TeacherCache`;
    every view, rebuilt from ``dataset``'s images and the cached view parameters) with
    ``encode_images`` and their captions with ``encode_texts``, and require cosine >= ``threshold``
    for the embeddings and, with ``full`` token storage, for the tokens (:data:`INT8_THRESHOLD` when
    int8-quantised); cached student pixels must match the rebuilt crops (:func:`verify_pixels`).
    Raises :class:`CacheVerifyError`; returns the minimum cosines."""
    ids = np.sort(np.random.default_rng(seed).choice(cache.num_images, size=min(n, cache.num_images), replace=False))
    check = OutputComparison(cache.path, threshold, threshold if cache.storage["dtype"] == "fp16" else INT8_THRESHOLD)
    with torch.inference_mode():
        for v in range(cache.num_views):
            params = cache.view_params(ids, v).numpy()
            partner, mix = cache.view_mix(ids, v)
            views = [view_image(dataset.load_image, int(i), p, int(j), m) for i, p, j, m in zip(ids, params, partner, mix)]
            full_tokens = v == 0 or cache.storage.get("view_tokens", "same") == "same"
            names = [f"image {i} view {v} ({dataset.images[i]})" for i in ids]
            check.images(cache.images(ids, v, tokens="full" if full_tokens else "auto"), encode_images(views), names,
                         tokens=cache.storage["image_tokens"] == "full" and full_tokens)
            if cache.pixel_format is not None:
                verify_pixels(cache, ids, v, views, names)
        caps = np.concatenate([np.arange(cache.offsets[i], cache.offsets[i + 1]) for i in ids])
        check.texts(cache.texts(caps), encode_texts([dataset.captions[c] for c in caps]),
                    [f"caption {c} ({dataset.captions[c]!r})" for c in caps], tokens=cache.storage["text_tokens"] == "full")
    return check.worst


def verify_pixels(cache: Any, ids: np.ndarray, view: int, views: Sequence[Image.Image], names: list[str]) -> None:
    """Cached student pixels of ``view`` must equal the rebuilt crops (raw: exactly; JPEG: the
    decoded bytes equal the decoded re-encoding of the rebuilt crop to within 1 grey level on average)."""
    size = cache.pixel_size
    fresh = np.stack([crop_pixels(img, size) for img in views])
    if cache.pixel_format == "raw":
        got, limit = cache.pixels(ids, view).numpy(), 0.0
    else:
        def decode(data: Tensor, lengths: Tensor) -> np.ndarray:
            return decode_jpeg_batch(data, lengths, torch.device("cpu")).permute(0, 2, 3, 1).numpy()

        quality = int(cache.storage["pixels"]["quality"])
        encoded = [torch.from_numpy(encode_jpeg(c, quality).copy()) for c in fresh]
        got, limit = decode(*cache.jpeg(ids, view)), 1.0
        fresh = decode(torch.cat(encoded), torch.tensor([len(e) for e in encoded]))
    got, fresh = got.astype(np.int16), fresh.astype(np.int16)
    err = np.abs(got - fresh).reshape(len(ids), -1).mean(axis=1)
    if err.max() > limit:
        k = int(err.argmax())
        raise CacheVerifyError(f"{cache.path}: cached {cache.pixel_format} pixels of {names[k]} differ from the "
                               f"rebuilt crop (mean abs error {err[k]:.2f} > {limit}); the cache is stale or corrupt")
