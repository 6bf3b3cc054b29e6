"""Schema check of a teacher cache's ``manifest.json``: every field the reader uses, with its type,
range and cross-field consistency, so that a malformed manifest raises one
:class:`distill.core.cache.reader.ManifestError` naming the field instead of an ``IndexError``/``TypeError``/
``KeyError`` somewhere inside :class:`distill.core.cache.reader.TeacherCache`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from distill.core.cache.reader import FORMAT_VERSION, is_image_array
from distill.core.errors import ManifestError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
ENCODINGS = ("bfloat16",)


class _Check:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, what: str, value: Any) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ManifestError(f"{self.path}: field {field} must be {what}, got {shown}")

    def get(self, obj: dict[str, Any], key: str, field: str) -> Any:
        if key not in obj:
            raise ManifestError(f"{self.path}: missing field {field}")
        return obj[key]

    def dict(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def int(self, value: Any, field: str, low: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            self.fail(field, f"an integer >= {low}", value)
        return value

    def str(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, "a non-empty string", value)
        return value

    def number(self, value: Any, field: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(field, "a finite number", value)
        return float(value)

    def ints(self, value: Any, field: str, length: int | None = None, low: int = 0) -> list[int]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(field, f"a list of {length or 'some'} integers", value)
        for i, v in enumerate(value):
            self.int(v, f"{field}[{i}]", low)
        return value

    def record(self, value: Any, field: str) -> None:
        """A ``{shape, dtype, bytes, sha256}`` file record."""
        rec = self.dict(value, field)
        self.ints(self.get(rec, "shape", f"{field}.shape"), f"{field}.shape")
        self.str(self.get(rec, "dtype", f"{field}.dtype"), f"{field}.dtype")
        self.int(self.get(rec, "bytes", f"{field}.bytes"), f"{field}.bytes")
        sha = self.get(rec, "sha256", f"{field}.sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            self.fail(f"{field}.sha256", "64 lowercase hex digits", sha)
        if rec.get("encoding") is not None and rec["encoding"] not in ENCODINGS:
            self.fail(f"{field}.encoding", f"one of {ENCODINGS}", rec["encoding"])


#: Arrays without one row per image/caption (JPEG bytes of every view, addressed by ``image_jpeg_index``).
FLAT_ARRAYS = frozenset({"image_jpeg"})


def required_arrays(storage: dict[str, Any]) -> set[str]:
    """Array names every shard must hold for these storage settings."""
    names = {"image_embed", "text_embed", "view_params"}
    for side in ("image", "text"):
        mode = storage[f"{side}_tokens"]
        if mode != "none":
            names.add(f"{side}_tokens")
            if storage["dtype"] == "int8":
                names.add(f"{side}_tokens_scale")
            if mode.startswith("topk"):
                names.add(f"{side}_tokens_index")
    if storage["text_tokens"] != "none":
        names.add("text_mask")
    names.update(f"inter_{n}" for n in storage.get("intermediate_layers", []))
    return names


def validate_manifest(m: dict[str, Any], root: Path, path: Path) -> None:
    """Raise :class:`ManifestError` naming the first field of ``m`` that the reader cannot use.

    ``root`` is the cache folder (every shard ``dir`` must stay inside it), ``path`` the manifest
    file named in messages."""
    c = _Check(path)
    version = c.get(m, "format_version", "format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    teacher = c.dict(c.get(m, "teacher", "teacher"), "teacher")
    c.str(c.get(teacher, "spec", "teacher.spec"), "teacher.spec")
    c.str(c.get(teacher, "config_hash", "teacher.config_hash"), "teacher.config_hash")
    c.number(c.get(teacher, "logit_scale", "teacher.logit_scale"), "teacher.logit_scale")
    ds = c.dict(c.get(m, "dataset", "dataset"), "dataset")
    for key in ("name", "split", "fingerprint"):
        c.str(c.get(ds, key, f"dataset.{key}"), f"dataset.{key}")
    num_images = c.int(c.get(ds, "num_images", "dataset.num_images"), "dataset.num_images", 1)
    num_captions = c.int(c.get(ds, "num_captions", "dataset.num_captions"), "dataset.num_captions", 1)
    if not isinstance(ds.get("skipped", []), list):
        c.fail("dataset.skipped", "a list", ds["skipped"])
    storage = c.dict(c.get(m, "storage", "storage"), "storage")
    for key in ("image_tokens", "text_tokens"):
        c.str(c.get(storage, key, f"storage.{key}"), f"storage.{key}")
    if c.get(storage, "dtype", "storage.dtype") not in ("fp16", "int8"):
        c.fail("storage.dtype", "fp16 or int8", storage["dtype"])
    layers = storage.get("intermediate_layers", [])
    if not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers):
        c.fail("storage.intermediate_layers", "a list of layer names", layers)
    views = c.dict(c.get(m, "views", "views"), "views")
    c.int(c.get(views, "count", "views.count"), "views.count", 1)
    c.int(c.get(m, "shard_size", "shard_size"), "shard_size", 1)
    c.record(c.get(m, "offsets", "offsets"), "offsets")
    dims = c.dict(c.get(m, "dims", "dims"), "dims")
    c.int(c.get(dims, "embed", "dims.embed"), "dims.embed", 1)
    if dims.get("image_grid") is not None:
        c.ints(dims["image_grid"], "dims.image_grid", 2, 1)
    for key in ("image_tokens", "text_tokens"):
        if dims.get(key) is not None:
            c.ints(dims[key], f"dims.{key}", 2, 1)
    shards = c.get(m, "shards", "shards")
    if not isinstance(shards, list) or not shards:
        c.fail("shards", "a non-empty list of shard objects", shards)
    need = required_arrays(storage)
    images_at = captions_at = 0
    resolved_root = root.resolve()
    for i, s in enumerate(shards):
        f = f"shards[{i}]"
        c.dict(s, f)
        d = c.str(c.get(s, "dir", f"{f}.dir"), f"{f}.dir")
        if PurePosixPath(d).is_absolute() or "\\" in d or not (root / d).resolve().is_relative_to(resolved_root) \
                or (root / d).resolve() == resolved_root:
            c.fail(f"{f}.dir", f"a folder inside the cache {root}", d)
        for key, start, total in (("image_range", images_at, num_images), ("caption_range", captions_at, num_captions)):
            a, b = c.ints(c.get(s, key, f"{f}.{key}"), f"{f}.{key}", 2)
            if a != start or b < a or b > total:
                raise ManifestError(f"{path}: field {f}.{key} is {[a, b]}; shards must cover the rows in order "
                                    f"without gaps or overlaps (expected a range starting at {start}, ending <= {total})")
        images_at, captions_at = s["image_range"][1], s["caption_range"][1]
        if s["image_range"][1] == s["image_range"][0]:
            raise ManifestError(f"{path}: field {f}.image_range {s['image_range']} is empty")
        if s.get("image_grid") is not None:
            c.ints(s["image_grid"], f"{f}.image_grid", 2, 1)
        if s.get("image_stats") is not None:
            c.str(s["image_stats"], f"{f}.image_stats")
        if s.get("output_check") is not None:
            c.dict(s["output_check"], f"{f}.output_check")
        arrays = c.dict(c.get(s, "arrays", f"{f}.arrays"), f"{f}.arrays")
        missing = sorted(need - set(arrays))
        if missing:
            raise ManifestError(f"{path}: missing field {f}.arrays.{missing[0]} (required by the storage settings)")
        n_img, n_cap = s["image_range"][1] - s["image_range"][0], s["caption_range"][1] - s["caption_range"][0]
        for name, rec in arrays.items():
            if not isinstance(name, str) or not _ARRAY_NAME.fullmatch(name):
                c.fail(f"{f}.arrays key", "an array name (letters, digits, _ and .)", name)
            c.record(rec, f"{f}.arrays.{name}")
            rows = n_img if is_image_array(name) else n_cap
            if name in FLAT_ARRAYS:  # a byte blob addressed through its index array, not one row per sample
                continue
            if not rec["shape"] or rec["shape"][0] != rows:
                raise ManifestError(f"{path}: field {f}.arrays.{name}.shape {rec['shape']} does not start with the "
                                    f"shard's {rows} rows")
    if images_at != num_images or captions_at != num_captions:
        raise ManifestError(f"{path}: field shards covers {images_at} images / {captions_at} captions, but dataset "
                            f"says {num_images} / {num_captions}")
