"""Training data: raw images + captions joined with cached teacher outputs by sample id.

The training set indexes the IMAGES of a :class:`distill.core.cache.reader.TeacherCache`. For epoch ``e`` sample
``i`` uses caption ``offsets[i] + c`` and view ``v`` drawn from an RNG seeded by ``(seed, e, i)``, so
the choice does not depend on the order, the rank or the number of workers. The sampler yields
``(image index, epoch)`` pairs; every batch carries ``image_index``/``caption_index``/``view``, the
teacher features fetched for exactly those rows and the captions tokenized by the student's
tokenizer (handed to :class:`TeacherCollate` when the loader is built), so the training step
receives tensors only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from distill.core.cache.reader import TeacherCache
from distill.core.errors import CacheMismatchError, ConfigError, DatasetMismatchError
from distill.core.data.mixup import view_image
from distill.core.data.dataset import ImageTextDataset
from distill.core.features import TeacherTargets


def check_alignment(dataset: ImageTextDataset, cache: TeacherCache) -> None:
    """Raise :class:`DatasetMismatchError` unless ``cache`` was built from exactly ``dataset``."""
    where = f"--data {dataset.root} (name {dataset.name!r}, split {dataset.split!r})"
    try:
        cache.check(dataset_fingerprint=dataset.fingerprint())
    except CacheMismatchError as e:
        raise DatasetMismatchError(f"teacher cache {cache.path} was not built from {where}: {e}. "
                                   "Rebuild the cache or pass the --data/--split it was built from.") from e
    if cache.num_images != dataset.num_images or cache.num_captions != dataset.num_captions:
        raise DatasetMismatchError(
            f"teacher cache {cache.path} holds {cache.num_images} images / {cache.num_captions} captions but "
            f"{where} has {dataset.num_images} / {dataset.num_captions}")


def sample_choice(seed: int, epoch: int, index: int, num_captions: int, num_views: int) -> tuple[int, int]:
    """The (caption offset within the image, view) sample ``index`` uses in ``epoch``."""
    rng = np.random.default_rng([seed, epoch, index])
    c = int(rng.integers(num_captions))
    v = int(rng.integers(num_views)) if num_views > 1 else 0
    return c, v


class DistillTrainSet(Dataset):
    """Item ``(i, epoch)`` -> the student's pixels for image ``i`` seen through the cached view,
    the chosen caption text and the ids needed to fetch the teacher features."""

    def __init__(self, dataset: ImageTextDataset, cache: TeacherCache, transform: Callable[[Image.Image], Tensor],
                 seed: int, use_views: bool = True, pixels: str = "decode", max_views: int | None = None) -> None:
        self.dataset = dataset
        self.offsets = np.asarray(cache.offsets, dtype=np.int64)
        self.cache = cache
        if max_views is not None and max_views > cache.num_views:
            raise ConfigError(f"data.max_views={max_views} but the cache {cache.path} holds {cache.num_views} views")
        self.num_views = (max_views or cache.num_views) if use_views else 1
        self.transform = transform
        self.seed = seed
        #: "decode" (PIL workers) or the cache's pixel format ("raw"/"jpeg": the collate reads bytes)
        self.pixel_source = resolve_pixel_source(pixels, cache)

    def __len__(self) -> int:
        return self.dataset.num_images

    def choose(self, index: int, epoch: int) -> tuple[int, int]:
        """(global caption index, view) of image ``index`` in ``epoch``."""
        n_caps = int(self.offsets[index + 1] - self.offsets[index])
        c, v = sample_choice(self.seed, epoch, index, n_caps, self.num_views)
        return int(self.offsets[index]) + c, v

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        caption, view = self.choose(index, epoch)
        item = {"pixels": None, "text": self.dataset.captions[caption], "image_index": index,
                "caption_index": caption, "view": view}
        if self.pixel_source == "decode":
            item["pixels"] = self.transform(self.view_image(index, view))
        return item

    def view_image(self, index: int, view: int) -> Image.Image:
        """The PIL image of a cached view, mixup views rebuilt from their stored parameters."""
        if not view:
            return self.dataset.load_image(index)
        partner, mix = self.cache.view_mix([index], view)
        return view_image(self.dataset.load_image, index, self.cache.view_params([index], view)[0].numpy(),
                          int(partner[0]), mix[0])


def resolve_pixel_source(mode: str, cache: TeacherCache) -> str:
    """``data.pixels``: ``auto`` reads the cache's pixels when it holds them, ``cache`` requires
    them, ``decode`` always decodes the images with PIL. Returns ``decode``, ``raw`` or ``jpeg``."""
    from distill.core.data.pixels import PIXEL_MODES
    from distill.core.errors import PixelCacheError

    if mode not in PIXEL_MODES:
        raise ConfigError(f"data.pixels must be one of {'|'.join(PIXEL_MODES)}, not {mode!r}")
    if mode == "decode" or (mode == "auto" and cache.pixel_format is None):
        return "decode"
    if cache.pixel_format is None:
        raise PixelCacheError(f"data.pixels=cache but {cache.path} holds no pixels; rebuild it with "
                              "cache_teacher --pixels SIZE or set data.pixels=auto|decode")
    return cache.pixel_format


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded shuffling into global batches of ``global_batch`` images; rank ``r`` of ``world``
    yields rows ``[r*b:(r+1)*b]`` (``b = global_batch / world``) of each global batch, so the union of
    the ranks' batches is exactly the single-process batch. Incomplete last batches are dropped.

    ``set_epoch(epoch, start)`` selects the permutation and skips the first ``start`` batches
    (for exact resume).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True) -> None:
        if global_batch % world:
            raise ConfigError(f"global batch {global_batch} is not divisible by the world size {world}")
        if num_samples < global_batch:
            raise ConfigError(f"the training set has {num_samples} images, fewer than one batch of {global_batch}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of image indices used in ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        local = self.global_batch // self.world
        for b in range(self.start, self.batches_per_epoch()):
            rows = order[b * self.global_batch + self.rank * local: b * self.global_batch + (self.rank + 1) * local]
            yield [(int(i), self.epoch) for i in rows]


@dataclass
class TrainBatch:
    """One (per-rank) batch: student inputs plus the aligned teacher outputs."""

    pixels: Tensor
    texts: list[str]
    image_index: Tensor
    caption_index: Tensor
    view: Tensor
    teacher: TeacherTargets
    #: "float" (normalised [B, 3, H, W]), "raw" (uint8 [B, S, S, 3] from the cache) or "jpeg"
    #: (concatenated bytes + ``pixel_lengths``; stays on the CPU for ``decode_jpeg``)
    pixel_format: str = "float"
    pixel_lengths: Tensor | None = None
    #: ``texts`` tokenized by the student (``input_ids``, masks, ...); None when built without a tokenizer
    text: dict[str, Tensor] | None = None

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "TrainBatch":
        """A copy with ``fn`` applied to every tensor (teacher features included)."""
        f = lambda x: None if x is None else fn(x)  # noqa: E731
        return TrainBatch(f(self.pixels), self.texts, f(self.image_index), f(self.caption_index), f(self.view),
                          self.teacher.map(fn), self.pixel_format, f(self.pixel_lengths),
                          None if self.text is None else {k: f(v) for k, v in self.text.items()})

    def to(self, device: torch.device) -> "TrainBatch":
        """Move to ``device``; fp16 teacher features become float32 there."""
        def move(x: Tensor) -> Tensor:
            x = x.to(device, non_blocking=True)
            return x.float() if x.dtype == torch.float16 else x

        moved = self.apply(move)
        if self.pixel_format == "jpeg":  # decode_jpeg reads its input from host memory
            moved.pixels, moved.pixel_lengths = self.pixels, self.pixel_lengths
        return moved

    def pin_memory(self) -> "TrainBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self.apply(Tensor.pin_memory)


def fetch_teacher(cache: TeacherCache, image_index: np.ndarray, caption_index: np.ndarray, view: np.ndarray,
                  keep_fp16: bool = False, tokens: str = "auto") -> TeacherTargets:
    """Vectorised lookup of the cached teacher targets of the given rows, the caption-mean target
    included (:meth:`TeacherCache.targets`; ``keep_fp16``: arrays stored in fp16 stay fp16 until
    :meth:`TrainBatch.to`; ``tokens``: see :meth:`TeacherCache.token_source`)."""
    return cache.targets(image_index, caption_index, view, keep_fp16, tokens=tokens)


class TeacherCollate:
    """DataLoader ``collate_fn``: stacks the student inputs, tokenizes the captions with ``tokenize``
    (the student's tokenizer; none: ``TrainBatch.text`` stays None) and fetches the teacher features
    of exactly the batch's (image, view) and caption ids. The cache re-opens its memory maps when
    pickled into worker processes."""

    def __init__(self, cache: TeacherCache, tokens: str = "auto",
                 tokenize: Callable[[Sequence[str]], dict[str, Tensor]] | None = None) -> None:
        self.cache = cache
        self.tokens = tokens  # "full" when only view 0 is used (data.use_views=false)
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> TrainBatch:
        image_index = np.asarray([it["image_index"] for it in items], dtype=np.int64)
        caption_index = np.asarray([it["caption_index"] for it in items], dtype=np.int64)
        view = np.asarray([it["view"] for it in items], dtype=np.int64)
        pixels, fmt, lengths = self.student_pixels(items, image_index, view)
        texts = [it["text"] for it in items]
        return TrainBatch(pixels=pixels, texts=texts,
                          image_index=torch.from_numpy(image_index), caption_index=torch.from_numpy(caption_index),
                          view=torch.from_numpy(view), teacher=fetch_teacher(self.cache, image_index, caption_index, view,
                                                                      keep_fp16=True, tokens=self.tokens),
                          pixel_format=fmt, pixel_lengths=lengths,
                          text=dict(self.tokenize(texts)) if self.tokenize is not None else None)

    def student_pixels(self, items: list[dict[str, Any]], image_index: np.ndarray,
                       view: np.ndarray) -> tuple[Tensor, str, Tensor | None]:
        """(pixels, format, JPEG lengths): decoded tensors stacked, or the cache's stored bytes."""
        if items[0]["pixels"] is not None:
            return torch.stack([it["pixels"] for it in items]), "float", None
        if self.cache.pixel_format == "jpeg":
            data, lengths = self.cache.jpeg(image_index, view)
            return data, "jpeg", lengths
        return self.cache.pixels(image_index, view), "raw", None
