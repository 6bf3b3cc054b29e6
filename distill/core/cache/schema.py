"""The teacher cache format, spelled once: file names, the shard arrays (names, rows, dtypes) derived
from the teacher-output schema (:class:`distill.core.features.ImageFeatures` /
:class:`~distill.core.features.TextFeatures`), and the schema check of ``manifest.json``.

A cache folder holds ``manifest.json`` (:data:`MANIFEST`), ``offsets.npy`` (:data:`OFFSETS`, the
first caption of every image) and ``shards/<i>/`` with one ``.npy`` per array and ``shard.json``
(:data:`SHARD_JSON`). The arrays of a tower store the fields of its features: field ``f`` of tower
``t`` is array ``<t>_<suffix>`` (:data:`FIELD_SUFFIX`: ``image_embed``, ``text_tokens``,
``text_tokens_index``, ``text_mask``, ...), ``intermediates[layer]`` is ``inter_<layer>``
(``inter_image.11``), int8 tokens carry ``<array>_scale``; besides these a shard holds the view
parameters and, optionally, the mixup parameters and the student pixels of every view
(:data:`ARRAYS`). Image arrays have one row per image and view (``[n, V, ...]``), text arrays one
per caption (``[m, ...]``).

:func:`validate_manifest` checks every manifest field the reader uses, with its type, range and
cross-field consistency, so that a malformed manifest raises one :class:`ManifestError` naming the
field instead of an ``IndexError``/``TypeError``/``KeyError`` inside
:class:`distill.core.cache.reader.TeacherCache`. The manifest carries ``manifest_sha256``, the sha256
of the rest of it (:func:`manifest_checksum`), so that its own checksum fields (every array's and
the offsets' ``sha256``) cannot change unnoticed; :func:`read_manifest` checks it. A manifest
written before the checksum existed is read with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from torch import Tensor

from distill.core.errors import ManifestError
from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The manifest field holding the sha256 of the rest of the manifest (:func:`manifest_checksum`).
MANIFEST_CHECKSUM = "manifest_sha256"
OFFSETS = "offsets.npy"
SHARD_JSON = "shard.json"
SHARDS = "shards"
VERIFY_MODES = ("none", "size", "lazy", "full", "auto")
#: Default integrity check of :class:`~distill.core.cache.reader.TeacherCache`: ``auto`` = ``lazy`` for
#: caches of at most ``reader.LAZY_MAX_BYTES_PER_IMAGE`` stored bytes per image (all views and
#: captions), else ``size``.
DEFAULT_VERIFY = "auto"

# -- the arrays ------------------------------------------------------------------------------------
IMAGE, TEXT = "image", "text"
#: The features type of each tower: which fields a tower has (``mask`` only for text).
FEATURES: dict[str, type] = {IMAGE: ImageFeatures, TEXT: TextFeatures}
#: Feature field -> array name suffix (``<tower>_<suffix>``) of the fields stored one array each.
FIELD_SUFFIX = {"embed": "embed", "tokens": "tokens", "token_index": "tokens_index", "mask": "mask"}
SCALE_SUFFIX = "_scale"
INTER_PREFIX = "inter_"

VIEW_TOKENS = "image_view_tokens"
VIEW_PARAMS = "view_params"
VIEW_PARTNER = "view_params_partner"
VIEW_MIX = "view_params_mix"
PIXELS = "image_pixels"
JPEG = "image_jpeg"
JPEG_INDEX = "image_jpeg_index"


def has_field(tower: str, field: str) -> bool:
    """Whether the features of ``tower`` have ``field`` (e.g. only text features have a ``mask``)."""
    return field in {f.name for f in dataclasses.fields(FEATURES[tower])}


def field_array(tower: str, field: str) -> str:
    """The array holding feature ``field`` of ``tower``: ``("image", "embed")`` -> ``image_embed``."""
    if field not in FIELD_SUFFIX or not has_field(tower, field):
        raise KeyError(f"{tower} features have no stored field {field!r}")
    return f"{tower}_{FIELD_SUFFIX[field]}"


def inter_array(layer: str) -> str:
    """The array of intermediate layer ``layer`` (``image.11`` -> ``inter_image.11``)."""
    return INTER_PREFIX + layer


def layer_tower(layer: str) -> str:
    """The tower of an intermediate layer name (``image.11`` -> ``image``)."""
    return IMAGE if layer.startswith(IMAGE + ".") else TEXT


def scale_array(name: str) -> str:
    """The per-token int8 scale companion of a token array (``--dtype int8``)."""
    return name + SCALE_SUFFIX


@dataclass(frozen=True)
class ArraySpec:
    """One shard array: ``rows`` is the tower it is indexed by (IMAGE: ``[n, V, ...]``, one row per
    image and view; TEXT: ``[m, ...]``, one per caption); ``dtype`` the numpy dtype the reader
    returns (``float32`` for floating arrays: fp16-stored ones pass through as fp16 on request);
    ``stored`` the dtype the writer writes (floats nominally: fp16 teacher outputs may be stored
    wider after an fp16 overflow, token arrays as int8 with ``--dtype int8``); ``flat``: a byte blob
    without one row per sample."""

    name: str
    rows: str
    dtype: str = "float32"
    stored: str = "float32"
    flat: bool = False

    @property
    def fp16(self) -> bool:
        """A float teacher output the writer stores in fp16 (range-checked, see ``--overflow``)."""
        return self.stored == "float16"


def _tower_specs(tower: str) -> list[ArraySpec]:
    """The arrays of the stored fields of ``tower``'s features (and the int8 token scales)."""
    out = [ArraySpec(field_array(tower, "embed"), tower, stored="float16"),
           ArraySpec(field_array(tower, "tokens"), tower, stored="float16"),
           ArraySpec(scale_array(field_array(tower, "tokens")), tower),
           ArraySpec(field_array(tower, "token_index"), tower, "int64", "int16")]
    if has_field(tower, "mask"):
        out.append(ArraySpec(field_array(tower, "mask"), tower, "bool", "uint8"))
    return out


#: Every array of fixed name (intermediate-layer arrays are named by :func:`inter_array`).
ARRAYS: dict[str, ArraySpec] = {s.name: s for s in [
    *_tower_specs(IMAGE),
    ArraySpec(VIEW_TOKENS, IMAGE, stored="float16"),  # every view's tokens pooled (--view-tokens grid:<g>)
    ArraySpec(scale_array(VIEW_TOKENS), IMAGE),
    *_tower_specs(TEXT),
    ArraySpec(VIEW_PARAMS, IMAGE),  # [n, V, 5] (top, left, height, width, flip)
    ArraySpec(VIEW_PARTNER, IMAGE, "int64", "int64"),  # mixup partner image (-1: a plain view)
    ArraySpec(VIEW_MIX, IMAGE),  # [n, V, 6] mixup parameters
    ArraySpec(PIXELS, IMAGE, "uint8", "uint8"),  # [n, V, S, S, 3] student crops
    ArraySpec(JPEG, IMAGE, "uint8", "uint8", flat=True),  # JPEG bytes of every view
    ArraySpec(JPEG_INDEX, IMAGE, "int64", "int64"),  # [n, V, 2] (start, length) into image_jpeg
]}


def array_spec(name: str) -> ArraySpec:
    """The spec of any array name (unknown names: float rows, image rows when named ``image_*`` /
    ``view_params*``)."""
    if name in ARRAYS:
        return ARRAYS[name]
    if name.startswith(INTER_PREFIX):
        return ArraySpec(name, layer_tower(name[len(INTER_PREFIX):]), stored="float16")
    return ArraySpec(name, IMAGE if name.startswith((IMAGE + "_", VIEW_PARAMS)) else TEXT)


def is_image_array(name: str) -> bool:
    """Whether a shard array is indexed by image (``[n, V, ...]``) rather than by caption."""
    return array_spec(name).rows == IMAGE


def stored_in_fp16(name: str) -> bool:
    """Whether the writer stores this float array in fp16 (embeddings, fp16 tokens, intermediates)."""
    return array_spec(name).fp16


def tower_arrays(tower: str, token_mode: str) -> dict[str, str]:
    """Feature field -> array of the per-field arrays ``tower`` stores under the token storage
    ``token_mode`` (``full|grid:<g>|topk:<k>|none``): the embedding always; with tokens also their
    mask (text) and, for top-k, their positions."""
    fields = ["embed"]
    if token_mode != "none":
        fields += ["tokens", *(["token_index"] if token_mode.startswith("topk") else []),
                   *(["mask"] if has_field(tower, "mask") else [])]
    return {f: field_array(tower, f) for f in fields}


def required_arrays(storage: dict[str, Any]) -> set[str]:
    """Array names every shard must hold for these storage settings."""
    names = {VIEW_PARAMS}
    for tower in (IMAGE, TEXT):
        arrays = tower_arrays(tower, storage[f"{tower}_tokens"])
        names.update(arrays.values())
        if "tokens" in arrays and storage["dtype"] == "int8":
            names.add(scale_array(arrays["tokens"]))
    names.update(inter_array(n) for n in storage.get("intermediate_layers", []))
    return names


def target_arrays(t: TeacherTargets) -> dict[str, Tensor]:
    """Every tensor of teacher targets named by the array it comes from (``image_embed``,
    ``text_tokens``, ``inter_image.11``, ...; the caption-mean target as ``text_embed_mean``)."""
    out: dict[str, Tensor] = {}
    for tower, f in ((IMAGE, t.image), (TEXT, t.text)):
        for field in FIELD_SUFFIX:
            value = getattr(f, field, None)
            if value is not None:
                out[field_array(tower, field)] = value
        out.update({inter_array(layer): v for layer, v in f.intermediates.items()})
    if t.text_embed_mean is not None:
        out["text_embed_mean"] = t.text_embed_mean
    return out


# -- manifest.json ---------------------------------------------------------------------------------
_MANIFEST_KEYS = ("format_version", "teacher", "dataset", "storage", "views", "shard_size", "shards", "dims", "offsets")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
#: Array record ``encoding``\s: arrays stored as bit patterns of another type (bfloat16 as uint16).
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
            if array_spec(name).flat:  # a byte blob addressed through its index array, not one row per sample
                continue
            if not rec["shape"] or rec["shape"][0] != rows:
                raise ManifestError(f"{path}: field {f}.arrays.{name}.shape {rec['shape']} does not start with the "
                                    f"shard's {rows} rows")
        _check_against_dims(c, m, f, arrays)
    if images_at != num_images or captions_at != num_captions:
        raise ManifestError(f"{path}: field shards covers {images_at} images / {captions_at} captions, but dataset "
                            f"says {num_images} / {num_captions}")


def _check_against_dims(c: _Check, m: dict[str, Any], f: str, arrays: dict[str, Any]) -> None:
    """The shapes of shard ``f``'s array records agree with ``views.count`` (image arrays hold
    ``[n, V, ...]``; full image tokens only view 0 under ``--view-tokens grid|none``) and ``dims``
    (embedding width, image token rows, text token width and length)."""
    views, dims, storage = m["views"]["count"], m["dims"], m["storage"]
    tokens_one_view = storage.get("view_tokens", "same") != "same"
    image_tokens = field_array(IMAGE, "tokens")
    for name, rec in arrays.items():
        shape = rec["shape"]
        if not is_image_array(name) or array_spec(name).flat:
            continue
        want = 1 if tokens_one_view and name in (image_tokens, scale_array(image_tokens),
                                                 field_array(IMAGE, "token_index")) else views
        if len(shape) < 2 or shape[1] != want:
            raise ManifestError(f"{c.path}: field views.count is {views}, but {f}.arrays.{name}.shape {shape} holds "
                                f"{shape[1] if len(shape) > 1 else 'no'} views (expected {want})")
    for name in (field_array(IMAGE, "embed"), field_array(TEXT, "embed")):
        if name in arrays and arrays[name]["shape"][-1] != dims["embed"]:
            raise ManifestError(f"{c.path}: field dims.embed is {dims['embed']}, but {f}.arrays.{name}.shape "
                                f"{arrays[name]['shape']} holds embeddings of width {arrays[name]['shape'][-1]}")
    if image_tokens in arrays and dims.get("image_tokens") is not None \
            and arrays[image_tokens]["shape"][2:] != dims["image_tokens"]:
        raise ManifestError(f"{c.path}: field dims.image_tokens is {dims['image_tokens']}, but "
                            f"{f}.arrays.{image_tokens}.shape is {arrays[image_tokens]['shape']}")
    text_tokens = field_array(TEXT, "tokens")
    if text_tokens in arrays and dims.get("text_tokens") is not None:
        shape, (length, width) = arrays[text_tokens]["shape"], dims["text_tokens"]
        if len(shape) != 3 or shape[2] != width or shape[1] > length:
            raise ManifestError(f"{c.path}: field dims.text_tokens is {dims['text_tokens']}, but "
                                f"{f}.arrays.{text_tokens}.shape is {shape}")


def manifest_checksum(m: dict[str, Any]) -> str:
    """sha256 of a manifest without its ``manifest_sha256`` field, over a canonical JSON encoding
    (sorted keys, no whitespace; Python floats round-trip exactly through JSON)."""
    body = {k: v for k, v in m.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_UNSIGNED_WARNED: set[str] = set()


def _check_manifest_checksum(m: dict[str, Any], path: Path) -> None:
    stored = m.get(MANIFEST_CHECKSUM)
    if stored is None:
        if str(path) not in _UNSIGNED_WARNED:  # once per process and cache
            _UNSIGNED_WARNED.add(str(path))
            print(f"warning: {path} carries no {MANIFEST_CHECKSUM} (written before manifest checksums): its "
                  "checksum fields cannot be verified; rerun cache_teacher with the same arguments to add one "
                  "(every shard is reused)", file=sys.stderr)
        return
    if stored != manifest_checksum(m):
        raise ManifestError(f"{path}: content does not match its {MANIFEST_CHECKSUM} (the manifest was edited or "
                            "is corrupt); rerun cache_teacher with the same arguments to rewrite it")


def read_manifest(root: Path, checksum: bool = True) -> dict[str, Any]:
    """Parse and validate ``root/manifest.json`` (:func:`validate_manifest`), then, with ``checksum``,
    check its ``manifest_sha256`` (a manifest without one: a warning, once per process)."""
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: not a teacher cache, or its writer has not finished")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing field(s) {', '.join(missing)}")
    validate_manifest(manifest, root, path)
    if checksum:
        _check_manifest_checksum(manifest, path)
    return manifest
