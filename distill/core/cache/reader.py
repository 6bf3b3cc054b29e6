"""Read a teacher-output cache written by ``python -m distill.cache_teacher``.

The layout is described in README.md (Design > Cache format). :class:`TeacherCache` memory-maps
every shard array and gathers rows for arbitrary global image / caption indices, returning float32
torch tensors (fp16 upcast, int8 dequantised), so it can sit in a training DataLoader.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from distill.core.cache.encode import dequantize_int8
from distill.core.errors import CacheError, CacheCorruptError, ManifestError, CacheMismatchError, StaleCacheError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
SHARD_JSON = "shard.json"
VERIFY_MODES = ("none", "size", "lazy", "full", "auto")
#: Default integrity check of :class:`TeacherCache`: ``auto`` = ``lazy`` for caches of at most
#: LAZY_MAX_BYTES_PER_IMAGE stored bytes per image (all views and captions), else ``size``.
DEFAULT_VERIFY = "auto"
#: sha256 runs at ~2 GB/s and an epoch decodes each image (~0.7 ms CPU): hashing up to 64 kB per
#: image stays under 5% of an epoch's data-side time (benchmarks/cache_verify_cost.py measured 49%
#: for a 700 kB/image ViT-B/16 full-token cache).
LAZY_MAX_BYTES_PER_IMAGE = 64 * 1024
_MANIFEST_KEYS = ("format_version", "teacher", "dataset", "storage", "views", "shard_size", "shards", "dims", "offsets")
#: Rows at least this large are gathered row by row straight into the batch (one copy).
ROW_COPY_BYTES = 16384
_IMAGE_ARRAY_PREFIXES = ("image_", "view_params", "inter_image.")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_image_array(name: str) -> bool:
    """Whether a shard array is indexed by image (``[n, V, ...]``) rather than by caption."""
    return name.startswith(_IMAGE_ARRAY_PREFIXES)


def check_file(path: Path, entry: dict[str, Any], verify: str) -> None:
    """Check one cache file against its ``{bytes, sha256}`` record (``verify``: none|size|lazy|full;
    ``lazy`` checks the size here and the sha256 on first read, see :meth:`TeacherCache._gather`)."""
    if not path.is_file():
        raise CacheCorruptError(f"missing cache file {path}")
    if verify in ("size", "lazy", "full") and path.stat().st_size != entry["bytes"]:
        raise CacheCorruptError(f"{path}: size {path.stat().st_size} bytes, expected {entry['bytes']} (truncated or overwritten)")
    if verify == "full" and sha256_file(path) != entry["sha256"]:
        raise CacheCorruptError(f"{path}: sha256 mismatch (the file is corrupt)")


def load_array(path: Path, entry: dict[str, Any] | None = None) -> np.ndarray:
    """Memory-map a ``.npy`` file, turning read/format failures into :class:`CacheCorruptError`."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CacheCorruptError(f"cannot read cache array {path}: {e}") from e
    if entry is not None and (list(arr.shape) != list(entry["shape"]) or str(arr.dtype) != entry["dtype"]):
        raise CacheCorruptError(f"{path}: array is {arr.dtype}{list(arr.shape)}, manifest says {entry['dtype']}{entry['shape']}")
    return arr


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and minimally validate ``root/manifest.json``."""
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
    from distill.core.cache.manifest import validate_manifest  # imports this module

    validate_manifest(manifest, root, path)
    return manifest


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers stored as their uint16 bit patterns."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _as_index(idx: Any, size: int, what: str) -> np.ndarray:
    a = idx.detach().cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)
    a = np.atleast_1d(a).astype(np.int64, copy=False)
    if a.ndim != 1:
        raise ValueError(f"{what} indices must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= size):
        raise IndexError(f"{what} index out of range [0, {size}): {a.min()}..{a.max()}")
    return a


class TeacherCache:
    """Memory-mapped view of a teacher cache directory.

    ``verify``: ``"none"`` (trust the files), ``"size"`` (every file exists with the recorded size
    and shape), ``"lazy"`` (sizes at open, and each array file's sha256 the first time this
    process reads from it), ``"full"`` (re-hash every array with sha256 at open) or ``"auto"``
    (default: ``lazy`` when the cache stores at most :data:`LAZY_MAX_BYTES_PER_IMAGE` per image,
    where hashing is cheap next to an epoch, else ``size``); :attr:`verify` holds the mode used.
    """

    def __init__(self, path: str | Path, verify: str = DEFAULT_VERIFY) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.path = Path(path)
        self.verify = verify
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if verify == "auto":
            stored = sum(e["bytes"] for s in m["shards"] for e in s["arrays"].values())
            verify = self.verify = "lazy" if stored <= LAZY_MAX_BYTES_PER_IMAGE * m["dataset"]["num_images"] else "size"
        self.storage: dict[str, Any] = m["storage"]
        self.dims: dict[str, Any] = m["dims"]
        self.num_images = int(m["dataset"]["num_images"])
        self.num_captions = int(m["dataset"]["num_captions"])
        self.num_views = int(m["views"]["count"])
        self.logit_scale = float(m["teacher"]["logit_scale"])
        self.image_grid: tuple[int, int] | None = tuple(m["dims"]["image_grid"]) if m["dims"].get("image_grid") else None
        self.intermediate_layers: list[str] = list(self.storage.get("intermediate_layers", []))
        self._shards: list[dict[str, Any]] = m["shards"]
        self._image_starts = np.array([s["image_range"][0] for s in self._shards], dtype=np.int64)
        self._caption_starts = np.array([s["caption_range"][0] for s in self._shards], dtype=np.int64)
        offsets_path = self.path / OFFSETS
        check_file(offsets_path, m["offsets"], verify)
        self.offsets: np.ndarray = np.array(load_array(offsets_path, m["offsets"]))
        if len(self.offsets) != self.num_images + 1 or self.offsets[-1] != self.num_captions:
            raise CacheCorruptError(f"{offsets_path}: inconsistent with {self.num_images} images / {self.num_captions} captions")
        self._arrays: list[dict[str, np.ndarray]] = []
        self._hashed: set[tuple[int, str]] = set()
        self._open(verify)

    # -- opening / pickling (DataLoader workers re-open the memory maps) --------------------------
    def _open(self, verify: str) -> None:
        self._arrays = []
        for s in self._shards:
            folder = self.path / s["dir"]
            arrays = {}
            for name, entry in s["arrays"].items():
                f = folder / f"{name}.npy"
                check_file(f, entry, verify)
                arrays[name] = load_array(f, entry)
            self._arrays.append(arrays)
        # per-row shape of every array; caption-length axes may differ between shards -> use the max
        self._row_shapes: dict[str, list[int]] = {}
        for arrays in self._arrays:
            for name, a in arrays.items():
                row = list(a.shape[2:] if is_image_array(name) else a.shape[1:])
                old = self._row_shapes.setdefault(name, row)
                self._row_shapes[name] = [max(x, y) for x, y in zip(old, row)]
        # arrays stored in fp16 in every shard (``keep_fp16`` passes them through); bf16 bit patterns
        self._fp16 = {n for n in self._row_shapes if all(a[n].dtype == np.float16 for a in self._arrays)}
        self._bf16 = {(i, n) for i, s in enumerate(self._shards) for n, e in s["arrays"].items()
                      if e.get("encoding") == "bfloat16"}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hashed = set()  # lazy verification is per process
        self._open("none")

    # -- metadata --------------------------------------------------------------------------------
    @property
    def teacher_hash(self) -> str:
        return self.manifest["teacher"]["config_hash"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    @property
    def caption_image(self) -> np.ndarray:
        """[num_captions] image index of every caption."""
        return np.repeat(np.arange(self.num_images), np.diff(self.offsets))

    def __len__(self) -> int:
        return self.num_images

    def check(self, teacher_hash: str | None = None, dataset_fingerprint: str | None = None) -> None:
        """Raise :class:`CacheMismatchError` unless the cache was built by this teacher / dataset."""
        if teacher_hash is not None and teacher_hash != self.teacher_hash:
            raise CacheMismatchError(f"{self.path}: cache built with teacher {self.manifest['teacher']['spec']} "
                                     f"(config_hash {self.teacher_hash[:12]}), not the requested one ({teacher_hash[:12]})")
        if dataset_fingerprint is not None and dataset_fingerprint != self.dataset_fingerprint:
            d = self.manifest["dataset"]
            raise CacheMismatchError(f"{self.path}: cache built for dataset {d['name']}/{d['split']} "
                                     f"(fingerprint {self.dataset_fingerprint[:12]}), not the requested one ({dataset_fingerprint[:12]})")

    def describe(self) -> dict[str, Any]:
        """Summary for logs and benchmarks: sizes, storage settings and bytes per sample."""
        total = sum(e["bytes"] for s in self._shards for e in s["arrays"].values())
        return {"path": str(self.path), "teacher": self.manifest["teacher"]["spec"], "teacher_hash": self.teacher_hash,
                "dataset": {k: self.manifest["dataset"][k] for k in ("name", "split", "fingerprint")},
                "num_images": self.num_images, "num_captions": self.num_captions, "num_views": self.num_views,
                "num_shards": len(self._shards), "storage": self.storage, "dims": self.dims,
                "total_bytes": total, "bytes_per_sample": bytes_per_sample(self)}

    def _hash_once(self, shard: int, name: str) -> None:
        """sha256 of one array file (and its int8 scale), the first time this process reads it."""
        s = self._shards[shard]
        for n in (name, f"{name}_scale"):
            if n in s["arrays"] and (shard, n) not in self._hashed:
                check_file(self.path / s["dir"] / f"{n}.npy", s["arrays"][n], "full")
                self._hashed.add((shard, n))

    def check_images(self, stats_digest: Callable[[int, int], str]) -> None:
        """Raise :class:`StaleCacheError` when the images of a shard changed (size or mtime) since
        the shard was written. ``stats_digest(start, end)`` is the dataset's digest of those images
        (:meth:`distill.core.data.dataset.ImageTextDataset.stats_digest`); shards written before the digest was
        recorded are not checked."""
        stale = [s for s in self._shards if s.get("image_stats") is not None
                 and s["image_stats"] != stats_digest(*s["image_range"])]
        if stale:
            s = stale[0]
            raise StaleCacheError(f"{self.path}: image files of {len(stale)} shard(s), first {s['dir']} (images "
                                  f"{s['image_range'][0]}..{s['image_range'][1] - 1}), changed size or modification time "
                                  "after the cache was built; rerun python -m distill.cache_teacher with the same "
                                  "arguments to recompute the stale shards")

    # -- gathers ---------------------------------------------------------------------------------
    def images(self, idx: Any, view: int | Sequence[int] | Tensor = 0, keep_fp16: bool = False,
               tokens: str = "auto") -> dict[str, Tensor]:
        """Image-side outputs for global image indices ``idx`` (``view`` per batch or per sample):
        ``embed`` [B, D], ``tokens`` [B, N, C] (+ ``tokens_index`` [B, K] for top-k),
        ``inter.image.<i>`` [B, C]; all float32 except the int64 index. ``keep_fp16`` returns arrays
        stored in fp16 as fp16 (half the bytes to move; the trainer converts on the device).
        ``tokens`` picks the token array of caches written with ``--view-tokens`` (see
        :meth:`token_source`)."""
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        fields = {"embed": "image_embed"}
        source = self.token_source(tokens, views)
        if source == "views":
            fields["tokens"] = "image_view_tokens"
        elif source == "full":
            fields["tokens"] = "image_tokens"
            if self.storage["image_tokens"].startswith("topk"):
                fields["tokens_index"] = "image_tokens_index"
        fields.update({f"inter.{n}": f"inter_{n}" for n in self.intermediate_layers if n.startswith("image.")})
        return self._gather(ids, views, self._image_starts, fields, keep_fp16)

    def texts(self, idx: Any, keep_fp16: bool = False) -> dict[str, Tensor]:
        """Caption-side outputs for global caption indices: ``embed`` [B, D], ``tokens`` [B, L, C],
        ``mask`` [B, L] bool (+ ``tokens_index`` [B, K] for top-k), ``inter.text.<i>`` [B, C]
        (``keep_fp16`` as in :meth:`images`)."""
        ids = _as_index(idx, self.num_captions, "caption")
        fields = {"embed": "text_embed"}
        if self.storage["text_tokens"] != "none":
            fields.update(tokens="text_tokens", mask="text_mask")
            if self.storage["text_tokens"].startswith("topk"):
                fields["tokens_index"] = "text_tokens_index"
        fields.update({f"inter.{n}": f"inter_{n}" for n in self.intermediate_layers if n.startswith("text.")})
        return self._gather(ids, None, self._caption_starts, fields, keep_fp16)

    def token_source(self, tokens: str = "auto", views: np.ndarray | None = None) -> str | None:
        """Which image tokens :meth:`images` returns: ``"full"`` (``image_tokens``, the
        ``--image-tokens`` storage), ``"views"`` (``image_view_tokens``: every view pooled to the
        ``--view-tokens grid:<g>`` grid) or None (no tokens). ``tokens="full"`` asks for the
        full tokens (an error for views >= 1 they were not stored for), ``"auto"`` for the tokens of
        every view: the full ones unless the cache was written with ``--view-tokens grid|none``."""
        if tokens not in ("auto", "full"):
            raise ValueError(f"tokens must be auto or full, not {tokens!r}")
        if self.storage["image_tokens"] == "none":
            return None
        stored = self.storage.get("view_tokens", "same")
        if stored == "same":
            return "full"
        if tokens == "full":
            if views is not None and views.size and views.max() > 0:
                raise CacheError(f"{self.path}: full image tokens are cached for view 0 only "
                                 f"(--view-tokens {stored}); views >= 1 have {'none' if stored == 'none' else stored}")
            return "full"
        return "views" if stored.startswith("grid") else None

    def token_grid(self, tokens: str = "auto") -> tuple[int, int] | None:
        """The (h, w) grid of the image tokens :meth:`images` returns for ``tokens``."""
        source = self.token_source(tokens)
        if source == "views":
            return tuple(self.dims["view_token_grid"])  # type: ignore[return-value]
        return self.image_grid if source == "full" else None

    # -- mixup parameters and student pixels --------------------------------------------------------
    @property
    def pixel_format(self) -> str | None:
        """``raw`` / ``jpeg`` when the cache holds student pixels (``--pixels``), else None."""
        px = self.storage.get("pixels")
        return px["format"] if px else None

    @property
    def pixel_size(self) -> int | None:
        px = self.storage.get("pixels")
        return int(px["size"]) if px else None

    def view_mix(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> tuple[np.ndarray, np.ndarray]:
        """(partner [B] int64, mix [B, 6] float32) of mixup views (see :mod:`distill.core.data.mixup`); -1 and
        ``NO_MIX`` for plain views and caches without mixup views."""
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        if not self._arrays or "view_params_partner" not in self._arrays[0]:
            from distill.core.data.mixup import NO_MIX

            return np.full(len(ids), -1, dtype=np.int64), np.tile(NO_MIX, (len(ids), 1))
        got = self._gather(ids, views, self._image_starts, {"partner": "view_params_partner", "mix": "view_params_mix"})
        return got["partner"].numpy(), got["mix"].numpy()

    def pixels(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> Tensor:
        """uint8 [B, S, S, 3] student crops of the cached views (``--pixels S``, raw format)."""
        if self.pixel_format != "raw":
            raise CacheError(f"{self.path}: the cache holds no raw pixels (written without --pixels or with "
                             f"--pixel-format {self.pixel_format})")
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        return self._gather(ids, views, self._image_starts, {"pixels": "image_pixels"})["pixels"]

    def jpeg(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> tuple[Tensor, Tensor]:
        """(concatenated JPEG bytes uint8 [sum of lengths], lengths int64 [B]) of the cached views
        (``--pixels S --pixel-format jpeg``), in the order of ``idx``."""
        if self.pixel_format != "jpeg":
            raise CacheError(f"{self.path}: the cache holds no JPEG pixels (written without --pixels or with "
                             f"--pixel-format {self.pixel_format})")
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        index = self._gather(ids, views, self._image_starts, {"index": "image_jpeg_index"})["index"].numpy()
        shard_of = np.searchsorted(self._image_starts, ids, side="right") - 1
        parts = [self._arrays[s]["image_jpeg"][a:a + n] for s, (a, n) in zip(shard_of, index)]
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(index[:, 1].copy())

    def view_params(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> Tensor:
        """[B, 5] float32 (top, left, height, width, flip) of the cached views."""
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        return self._gather(ids, views, self._image_starts, {"params": "view_params"})["params"]

    def _gather(self, ids: np.ndarray, views: np.ndarray | None, starts: np.ndarray,
                fields: dict[str, str], keep_fp16: bool = False) -> dict[str, Tensor]:
        """Rows ``ids`` (and ``views``) of every array in ``fields``. Large rows (token features) are
        copied one by one straight from the memory map into the result, int8 rows dequantised on
        the way, so every byte is read and written once; small rows are gathered per shard. Rows
        narrower than the widest shard (text tokens) are zero-padded."""
        shard_of = np.searchsorted(starts, ids, side="right") - 1
        rel = ids - starts[shard_of]
        order = np.argsort(shard_of, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_of[order])) + 1
        groups = np.split(order, cuts) if len(ids) else []
        out: dict[str, Tensor] = {}
        for key, name in fields.items():
            floating = np.float16 if keep_fp16 and name in self._fp16 else np.float32
            dtype = {"text_mask": np.bool_, "image_tokens_index": np.int64, "text_tokens_index": np.int64,
                     "image_pixels": np.uint8, "image_jpeg_index": np.int64, "view_params_partner": np.int64}.get(name, floating)
            target = np.empty([len(ids), *self._row_shapes[name]], dtype=dtype)
            for sel in groups:
                si = int(shard_of[sel[0]])
                arrays = self._arrays[si]
                if self.verify == "lazy" and (si, name) not in self._hashed:
                    self._hash_once(si, name)
                src, scale = arrays[name], arrays.get(f"{name}_scale")
                if (si, name) in self._bf16:
                    src = _Bf16Rows(src)
                width = src.shape[2 if views is not None else 1] if target.ndim > 1 else None
                if width is not None and width != target.shape[1]:
                    target[sel, width:] = 0
                dst = target if width is None else target[:, :width]
                if target[0].nbytes < ROW_COPY_BYTES:
                    key_idx = (rel[sel],) if views is None else (rel[sel], views[sel])
                    vals = src[key_idx]
                    dst[sel] = vals if scale is None else dequantize_int8(vals, scale[key_idx])
                    continue
                for i in sel:
                    at = (rel[i],) if views is None else (rel[i], views[i])
                    if scale is None:
                        dst[i] = src[at]
                    else:
                        np.multiply(src[at], scale[at][..., None], out=dst[i], dtype=np.float32)
            out[key] = torch.from_numpy(target)
        return out


class _Bf16Rows:
    """Indexing view of a uint16 bfloat16 array that returns float32 rows."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits, self.shape = bits, bits.shape

    def __getitem__(self, key: Any) -> np.ndarray:
        return decode_bf16(self.bits[key])


def bytes_per_sample(cache: TeacherCache, fp16_as_fp32: bool = False) -> dict[str, float]:
    """Payload bytes per image (image-level arrays, all views) and per caption (text arrays), plus
    ``image_total``, ``text_total`` and ``per_image_with_captions`` (one image and its captions).
    ``fp16_as_fp32`` counts float16 arrays at 4 bytes (what the same cache would take in float32)."""
    totals: dict[str, int] = {}
    for s in cache.manifest["shards"]:
        for name, e in s["arrays"].items():
            dtype = np.dtype(e["dtype"])
            itemsize = 4 if fp16_as_fp32 and dtype == np.float16 else dtype.itemsize
            totals[name] = totals.get(name, 0) + int(np.prod(e["shape"])) * itemsize
    out = {name: t / (cache.num_images if is_image_array(name) else cache.num_captions) for name, t in sorted(totals.items())}
    image_total = sum(v for k, v in out.items() if is_image_array(k))
    text_total = sum(v for k, v in out.items() if not is_image_array(k))
    out.update(image_total=image_total, text_total=text_total,
               per_image_with_captions=image_total + text_total * cache.num_captions / max(cache.num_images, 1))
    return out


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
