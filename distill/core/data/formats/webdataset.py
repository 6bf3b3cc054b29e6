"""webdataset input: ``.tar`` shards of samples ``<key>.jpg`` (or ``.jpeg``/``.png``/``.webp``) +
``<key>.txt`` (one caption) and/or ``<key>.json`` (``{"caption": str}``, ``{"text": str}`` or
``{"captions": [str, ...]}``), as open_clip / img2dataset write them for CC3M, CC12M or LAION.

``--data`` is a shard path, a brace pattern (``shards/{000..009}.tar``; ``::`` separates several,
expanded by the ``webdataset`` package) or a folder of ``*.tar`` files (sorted by name).

The shards are indexed once per load: every tar header is read (not the image bytes), giving each
sample a stable global index (shard order, then member order within the shard) and the byte range
of its image inside the tar. The result is an ordinary :class:`~distill.core.data.dataset.ImageTextDataset`
whose ``load_image(i)`` reads those bytes directly, so the teacher cache, the training sampler
(exact resume, DDP = single process) and evaluation address webdataset samples exactly as they
address files. ``cache_teacher`` uses the samples per tar as its default ``--shard-size``, so under
``torchrun`` rank r reads tar shards r, r+W, ... (one cache shard per tar shard).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from distill.core.data.dataset import BadSample, ImageTextDataset, check_split
from distill.core.data.formats.base import DataSource, DatasetReader
from distill.core.data.formats.csv_tsv import FOLDER_FILES
from distill.core.errors import BadSampleError, ConfigError
from distill.core.registry import DATASET_FORMATS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")


def expand_shards(spec: str | Path) -> list[Path]:
    """Shard paths of ``spec``: a folder of ``*.tar`` (sorted), or a path / brace pattern."""
    p = Path(spec)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    from webdataset.shardlists import expand_urls

    return [Path(u) for u in expand_urls(str(spec))]


def is_webdataset(spec: str | Path) -> bool:
    """Whether ``spec`` names webdataset shards (``.tar`` paths / brace patterns, or a folder of
    ``*.tar`` files without a captions file)."""
    s = str(spec)
    if Path(s).is_dir():
        return any(Path(s).glob("*.tar")) and not any((Path(s) / c).is_file() for c in FOLDER_FILES)
    return s.endswith(".tar") or ("{" in s and ".tar" in s) or ("::" in s and ".tar" in s)


@dataclass
class WebDatasetImages(ImageTextDataset):
    """An :class:`ImageTextDataset` whose images are byte ranges inside tar shards.

    ``images[i]`` is ``<shard path relative to root>/<key>.<ext>``; ``members[i]`` is (shard
    number in ``shards``, byte offset, size) of its image."""

    shards: list[str] = field(default_factory=list)
    members: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    shard_counts: list[int] = field(default_factory=list)  # samples kept per shard

    def image_path(self, i: int) -> Path:
        return Path(self.shards[int(self.members[i, 0])])

    def image_bytes(self, i: int) -> bytes:
        shard, offset, size = (int(x) for x in self.members[i])
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def load_image(self, i: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.image_bytes(i))) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise BadSampleError(f"{self.image_sources[i]}: cannot decode image {self.images[i]}: {e}") from e

    def subset(self, image_indices: Sequence[int]) -> "WebDatasetImages":
        base = super().subset(image_indices)
        idx = np.asarray(list(image_indices), dtype=np.int64)
        return WebDatasetImages(base.root, base.images, base.captions, base.caption_image, base.name, base.split,
                                base.image_sources, base.skipped, list(self.shards), self.members[idx].reshape(-1, 3),
                                [])


def _captions(ext: str, data: bytes, where: str) -> list[str]:
    text = data.decode("utf-8")
    if ext == "txt":
        return [text.strip()]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSampleError(f"{where}: invalid JSON ({e})", where) from e
    caps = obj.get("captions", obj.get("caption", obj.get("text"))) if isinstance(obj, dict) else None
    caps = [caps] if isinstance(caps, str) else caps
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise BadSampleError(f"{where}: JSON has no 'caption'/'text' string or 'captions' list", where)
    return [c.strip() for c in caps]


def _index_shard(path: Path, check_decode: bool) -> list[tuple[str, str, int, int, list[str]] | BadSampleError]:
    """(key, image ext, offset, size, captions) per sample of one tar, in member order, or a
    :class:`BadSampleError` for a sample without an image or caption."""
    from webdataset.tariterators import base_plus_ext

    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            members = [m for m in tf if m.isfile()]
            for m in members:
                base, ext = base_plus_ext(m.name)  # webdataset's key rule: up to the first dot of the name
                if base is None:
                    continue  # no extension: not part of a sample
                if base not in groups:
                    groups[base] = {}
                    order.append(base)
                groups[base][ext.lower()] = m
            out: list[tuple[str, str, int, int, list[str]] | BadSampleError] = []
            for key in order:
                files, where = groups[key], f"{path}:{key}"
                image = next((e for e in IMAGE_EXTS if e in files), None)
                text = next((e for e in CAPTION_EXTS if e in files), None)
                try:
                    if image is None:
                        raise BadSampleError(f"{where}: no image ({'/'.join(IMAGE_EXTS)}) in the sample", where)
                    if text is None:
                        raise BadSampleError(f"{where}: no caption (.txt or .json) in the sample", where)
                    caps = _captions(text, tf.extractfile(files[text]).read(), where)
                    if not caps or not all(caps):
                        raise BadSampleError(f"{where}: empty caption", where)
                    m = files[image]
                    if check_decode:
                        try:
                            with Image.open(io.BytesIO(tf.extractfile(m).read())) as im:
                                im.convert("RGB")
                        except Exception as e:  # noqa: BLE001
                            raise BadSampleError(f"{where}: cannot decode image {m.name}: {e}", where) from e
                    out.append((key, image, m.offset_data, m.size, caps))
                except BadSampleError as e:
                    out.append(e)
    except (tarfile.TarError, OSError) as e:
        raise BadSampleError(f"{path}: not a readable tar shard ({e})", str(path)) from e
    return out


@DATASET_FORMATS.register("webdataset")
class WebDatasetReader(DatasetReader):
    """``.tar`` shards: a path, a brace pattern, ``::``-joined lists, or a folder of ``*.tar`` files
    (see the module docstring). Asked first: a pattern names no existing file."""

    priority = 10
    label = "webdataset shards"
    suffixes = (".tar",)
    folder = "*.tar shards"

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        return is_webdataset(source.spec)

    def read(self) -> WebDatasetImages:
        """Index the shards into a :class:`WebDatasetImages`."""
        return load_webdataset(self.source.spec, self.split, self.images_root, self.on_bad_sample, self.check_decode)


def load_webdataset(spec: str | Path, split: str | None = None, images_root: str | Path | None = None,
                    on_bad_sample: str = "error", check_decode: bool = False) -> WebDatasetImages:
    """Index the shards of ``spec`` into a :class:`WebDatasetImages` (see the module docstring)."""
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample must be 'error' or 'skip', not {on_bad_sample!r}")
    if images_root is not None:
        raise ConfigError(f"{spec}: --images-root does not apply to webdataset shards (images are inside the tars)")
    check_split(split, None, spec)
    shards = expand_shards(spec)
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"webdataset shards not found: {', '.join(missing) or spec}")
    root = Path(os.path.commonpath([str(s.resolve().parent) for s in shards]))
    images, captions, cap_img, sources, members, counts = [], [], [], [], [], []
    skipped: list[BadSample] = []
    for n, shard in enumerate(shards):
        kept = 0
        for item in _index_shard(shard, check_decode):
            if isinstance(item, BadSampleError):
                if on_bad_sample == "error":
                    raise item
                skipped.append(BadSample(item.where, str(item)))
                continue
            key, ext, offset, size, caps = item
            images.append(f"{shard.resolve().relative_to(root).as_posix()}/{Path(key).as_posix()}.{ext}")
            sources.append(f"{shard}:{key}")
            members.append((n, offset, size))
            captions.extend(caps)
            cap_img.extend([len(images) - 1] * len(caps))
            kept += 1
        counts.append(kept)
    if not images:
        raise BadSampleError(f"{spec}: no usable samples in {len(shards)} shard(s)")
    return WebDatasetImages(root, images, captions, np.asarray(cap_img, np.int64), shards[0].stem if len(shards) == 1
                            else root.name, split or "all", sources, skipped, [str(s.resolve()) for s in shards],
                            np.asarray(members, np.int64).reshape(-1, 3), counts)


def samples_per_shard(ds: ImageTextDataset) -> int | None:
    """Samples per tar when every shard but the last holds the same number (and the last no more):
    the cache shard size that makes cache shards coincide with tar shards; else None."""
    counts = getattr(ds, "shard_counts", None)
    if not counts or min(counts[:-1] or counts) < 1 or len(set(counts[:-1])) > 1 or counts[-1] > counts[0]:
        return None
    return counts[0]
