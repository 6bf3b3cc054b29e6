"""The image-caption dataset container and the validation every format reader shares.

:class:`ImageTextDataset` holds images (paths relative to a root) with their captions grouped by
image (``offsets[i]:offsets[i+1]`` are the captions of image ``i``), which is the layout of the
cache and of the multi-caption retrieval protocol. :func:`assemble` turns the (image, caption,
where) rows a format reader yields into one, validating every row (safe relative path, existing
and optionally decodable file, non-empty caption) and keeping the :class:`BadSample` records of
the rows ``on_bad_sample="skip"`` dropped; :func:`check_split` validates ``--split``.

The formats themselves (CSV/TSV, Karpathy JSON, COCO captions JSON, the Flickr8k layout,
webdataset shards) are readers in :mod:`distill.core.data.formats`, found and run by
:func:`distill.core.data.factory.load_dataset`.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile

from distill.core.data.image_checks import check_png_complete, to_rgb

from distill.core.errors import BadSampleError, ConfigError, DataError, NoSplitsError, SplitError

SPLIT_ALIASES = {"val": {"val", "dev"}, "dev": {"val", "dev"}, "train": {"train", "restval"}, "test": {"test"}}


def check_split(split: str | None, known: Iterable[str] | None, source: Path | str) -> None:
    """Raise unless ``split`` (None/"all": every row) is one of ``known`` (aliases: val=dev,
    train includes restval); ``known=None``: the format has no splits."""
    if split in (None, "all"):
        return
    if known is None:
        raise NoSplitsError(f"{source}: this dataset has no splits, so --split {split!r} cannot select rows; "
                            "use split 'all' (or omit --split) and keep train and test data in separate files")
    known = set(known)
    if not SPLIT_ALIASES.get(split, {split}) & known:
        raise SplitError(f"{source}: unknown split {split!r}; known splits: {', '.join(sorted(known)) or 'none'}")


def file_split(path: Path) -> list[str] | None:
    """The split a single-file dataset holds by its name (``captions_train2017.json`` -> ["train"]),
    when the name names exactly one of train/val/test; else None (no splits)."""
    words = {w.rstrip("0123456789") for w in re.split(r"[^a-z0-9]+", path.stem.lower())}
    found = [w for w in ("train", "val", "test") if w in words]
    return found if len(found) == 1 else None


@dataclass
class BadSample:
    where: str
    reason: str


@dataclass
class ImageTextDataset:
    """Images (paths relative to ``root``) with one or more captions each."""

    root: Path
    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # [num_captions] int64, non-decreasing image index of each caption
    name: str = "dataset"
    split: str = "all"
    image_sources: list[str] = field(default_factory=list)  # "file:row" where each image was declared
    skipped: list[BadSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) and np.any(np.diff(self.caption_image) < 0):
            raise DataError("captions must be grouped by image")
        if not self.image_sources:
            self.image_sources = [f"{self.name}:image {i}" for i in range(len(self.images))]

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def offsets(self) -> np.ndarray:
        """[num_images + 1] start offsets of each image's captions."""
        counts = np.bincount(self.caption_image, minlength=self.num_images)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def captions_of(self, i: int) -> list[str]:
        o = self.offsets
        return self.captions[o[i]:o[i + 1]]

    def image_path(self, i: int) -> Path:
        return self.root / self.images[i]

    def load_image(self, i: int) -> Image.Image:
        """Decode image ``i`` as RGB; a missing or corrupt file raises :class:`BadSampleError`."""
        return decode_image(self.image_path(i), self.image_sources[i])

    def image_stat(self, i: int) -> tuple[int, int]:
        """(size in bytes, mtime in ns) of image ``i``'s file; (-1, -1) when it cannot be stat'ed."""
        try:
            st = os.stat(self.image_path(i))
        except OSError:
            return -1, -1
        return st.st_size, st.st_mtime_ns

    def stats_digest(self, start: int = 0, end: int | None = None) -> str:
        """sha256 over the size and mtime of images ``start:end``; the cache records it per shard
        to detect image files replaced after caching (the content :meth:`fingerprint` does not
        change when a file is replaced under the same name)."""
        h = hashlib.sha256()
        for i in range(start, self.num_images if end is None else end):
            h.update(np.asarray(self.image_stat(i), dtype=np.int64).tobytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """sha256 over name-independent content: image paths, captions and their grouping."""
        h = hashlib.sha256()
        for p in self.images:
            h.update(p.encode() + b"\0")
        h.update(b"\1")
        for c in self.captions:
            h.update(c.encode() + b"\0")
        h.update(self.caption_image.tobytes())
        return h.hexdigest()

    def subset(self, image_indices: Sequence[int]) -> "ImageTextDataset":
        """A dataset of the chosen images (in the given order) and all their captions."""
        o = self.offsets
        caps: list[str] = []
        cap_img: list[int] = []
        for new, i in enumerate(image_indices):
            caps.extend(self.captions[o[i]:o[i + 1]])
            cap_img.extend([new] * int(o[i + 1] - o[i]))
        return ImageTextDataset(self.root, [self.images[i] for i in image_indices], caps, np.asarray(cap_img),
                                self.name, self.split, [self.image_sources[i] for i in image_indices], list(self.skipped))

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root), "num_images": self.num_images,
                "num_captions": self.num_captions, "fingerprint": self.fingerprint(),
                "skipped": len(self.skipped)}


class TransformedImages:
    """The images of a dataset through ``transform``, as a map-style dataset for a DataLoader."""

    def __init__(self, data: ImageTextDataset, transform: Callable[[Image.Image], Any]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.data.load_image(i))


def decode_image(path: Path, where: str) -> Image.Image:
    """Decode ``path`` fully as RGB; refuses truncated files (PNG included) and converts 16-bit
    images with scaling. Every failure is a :class:`BadSampleError` naming ``where`` and the file."""
    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library: never accept truncated images
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as im:
            im.load()
            if im.format == "PNG":
                check_png_complete(path)
            return to_rgb(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadSampleError(f"{where}: cannot decode image {path}: {e}") from e


def normalise_image_path(rel: str) -> str:
    """One spelling per file: ``./images/a.jpg``, ``images//a.jpg`` and ``images/../images/a.jpg``
    all become ``images/a.jpg`` (lexically; escapes are still refused by :func:`safe_relpath`)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return rel
    return posixpath.normpath(rel)


def safe_relpath(root: Path, rel: str, where: str) -> str:
    """Reject absolute paths and paths whose text leaves ``root`` through ``..``. Symlinks inside
    the root (e.g. ``images -> /mnt/big/images``) are the user's own and are followed."""
    if not isinstance(rel, str):
        raise BadSampleError(f"{where}: image path must be a string, got {type(rel).__name__} {rel!r}")
    if not rel:
        raise BadSampleError(f"{where}: empty image path")
    if "\0" in rel:
        raise BadSampleError(f"{where}: image path {rel!r} contains a NUL byte")
    p = Path(rel)
    if p.is_absolute():
        raise BadSampleError(f"{where}: image path {rel!r} is absolute; paths must be relative to {root}")
    if os.path.normpath(p).split(os.sep)[0] == "..":
        raise BadSampleError(f"{where}: image path {rel!r} escapes the data root {root} through '..' "
                             "(symlinks inside the root are followed; '..' paths are refused)")
    return p.as_posix()


#: One row a format reader yields: (image path relative to the root, caption, where it was read),
#: or a :class:`BadSampleError` in place of a malformed record.
Row = tuple[str, str, str] | BadSampleError


def assemble(root: Path, rows: Iterable[Row], name: str, split: str, on_bad: str,
              check_decode: bool = False) -> ImageTextDataset:
    """Group (image, caption, where) rows by image in first-seen order, validating each row.

    A loader yields a :class:`BadSampleError` instead of a row for a malformed record, so that
    ``on_bad="skip"`` skips it like any other bad row."""
    if on_bad not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample must be 'error' or 'skip', not {on_bad!r}")
    order: dict[str, int] = {}
    sources: list[str] = []
    per_image: list[list[str]] = []
    skipped: list[BadSample] = []
    bad_images: set[str] = set()
    for row in rows:
        where = row.where if isinstance(row, BadSampleError) else row[2]
        try:
            if isinstance(row, BadSampleError):
                raise row
            image, caption, _ = row
            image = normalise_image_path(image)
            if image in bad_images:
                raise BadSampleError(f"{where}: image {image!r} was rejected on an earlier row")
            try:
                if image not in order:
                    rel = safe_relpath(root, image, where)
                    path = root / rel
                    if not path.is_file():
                        raise BadSampleError(f"{where}: image file not found: {path} (image paths are relative to "
                                             f"{root}; pass --images-root DIR if the images are elsewhere)")
                    if check_decode:
                        decode_image(path, where)
            except BadSampleError:
                bad_images.add(image)
                raise
            if caption is not None and not isinstance(caption, str):
                raise BadSampleError(f"{where}: caption must be a string, got {type(caption).__name__}")
            if caption is None or not caption.strip():
                raise BadSampleError(f"{where}: empty caption for image {image!r}")
            if image not in order:
                order[image] = len(order)
                sources.append(where)
                per_image.append([])
            per_image[order[image]].append(caption.strip())
        except BadSampleError as e:
            if on_bad == "error":
                raise
            skipped.append(BadSample(where, str(e)))
    images = [Path(i).as_posix() for i in order]
    captions = [c for caps in per_image for c in caps]
    cap_img = np.repeat(np.arange(len(images)), [len(c) for c in per_image]) if images else np.zeros(0, np.int64)
    if not images:
        raise BadSampleError(f"{name}: no usable samples in split {split!r}")
    return ImageTextDataset(root, images, captions, cap_img, name, split, sources, skipped)


def in_split(row_split: str | None, split: str | None) -> bool:
    """Whether a row of split ``row_split`` (None: the row names none) belongs to ``split``."""
    if split in (None, "all") or row_split is None:
        return True
    return row_split in SPLIT_ALIASES.get(split, {split})
