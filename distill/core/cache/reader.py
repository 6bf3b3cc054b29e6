"""Read a teacher-output cache written by ``python -m distill.cache_teacher``.

The layout is described in README.md (Design > Cache format) and spelled in
:mod:`distill.core.cache.schema`. :class:`TeacherCache` memory-maps every shard array and gathers
rows for arbitrary global image / caption indices, returning the teacher-output schema
(:class:`ImageFeatures`, :class:`TextFeatures`, :class:`TeacherTargets`) of float32 torch tensors
(fp16 upcast, int8 dequantised, bfloat16 decoded), so it can sit in a training DataLoader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from distill.core.cache.encode import decode_bf16, dequantize_int8
from distill.core.cache.schema import (DEFAULT_VERIFY, IMAGE, JPEG, JPEG_INDEX, OFFSETS, PIXELS,
                                       TEXT, VERIFY_MODES, VIEW_MIX, VIEW_PARAMS, VIEW_PARTNER, VIEW_TOKENS, array_spec,
                                       field_array, inter_array, is_image_array, layer_tower, read_manifest, scale_array,
                                       tower_arrays)
from distill.core.cache.verify import check_file
from distill.core.errors import CacheCorruptError, CacheError, CacheMismatchError, ConfigError, StaleCacheError
from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures

#: sha256 runs at ~2 GB/s and an epoch decodes each image (~0.7 ms CPU): hashing up to 64 kB per
#: image stays under 5% of an epoch's data-side time (benchmarks/cache_verify_cost.py measured 49%
#: for a 700 kB/image ViT-B/16 full-token cache); ``verify="auto"`` is ``lazy`` up to this size.
LAZY_MAX_BYTES_PER_IMAGE = 64 * 1024
#: Rows at least this large are gathered row by row straight into the batch (one copy).
ROW_COPY_BYTES = 16384
#: Array files up to this size (view parameters, masks, small embeddings, ...) are sha256-checked at
#: open in the ``size`` and ``lazy`` modes too (``offsets.npy`` always is): a few ms per shard, and a
#: flipped bit in them would change every batch that reads them.
SMALL_ARRAY_BYTES = 1 << 20


def load_array(path: Path, entry: dict[str, Any] | None = None) -> np.ndarray:
    """Memory-map a ``.npy`` file, turning read/format failures into :class:`CacheCorruptError`."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CacheCorruptError(f"cannot read cache array {path}: {e}") from e
    if entry is not None and (list(arr.shape) != list(entry["shape"]) or str(arr.dtype) != entry["dtype"]):
        raise CacheCorruptError(f"{path}: array is {arr.dtype}{list(arr.shape)}, manifest says {entry['dtype']}{entry['shape']}")
    return arr


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
    Every mode but ``none`` also checks the manifest's own checksum, hashes ``offsets.npy`` and
    every array file of at most :data:`SMALL_ARRAY_BYTES` at open.
    """

    def __init__(self, path: str | Path, verify: str = DEFAULT_VERIFY) -> None:
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.path = Path(path)
        self.verify = verify
        self.manifest = read_manifest(self.path, checksum=verify != "none")
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
        check_file(offsets_path, m["offsets"], "none" if verify == "none" else "full")  # read whole right here
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
                small = verify in ("size", "lazy") and entry["bytes"] <= SMALL_ARRAY_BYTES
                check_file(f, entry, "full" if small else verify)
                if small:
                    self._hashed.add((len(self._arrays), name))
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

    def settings(self) -> dict[str, Any]:
        """The storage and view settings the cache was written with (the manifest's ``storage``:
        token storage, dtype, layers, view tokens, pixels; ``views``: count, seed, scale, mixup):
        what a resumed training run must find unchanged."""
        return {"storage": self.storage, "views": self.manifest["views"]}

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
        for n in (name, scale_array(name)):
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
               tokens: str = "auto") -> ImageFeatures:
        """The teacher's image features of global image indices ``idx`` (``view`` per batch or per
        sample): ``embed`` [B, D], ``tokens`` [B, N, C] with their ``grid`` (+ ``token_index`` [B, K]
        for top-k storage), ``intermediates`` (``image.<i>`` -> [B, C]); all float32 except the int64
        index. ``keep_fp16`` returns arrays stored in fp16 as fp16 (half the bytes to move; the
        trainer converts on the device). ``tokens`` picks the token array of caches written with
        ``--view-tokens`` (see :meth:`token_source`)."""
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        source = self.token_source(tokens, views)
        fields = tower_arrays(IMAGE, self.storage["image_tokens"] if source == "full" else "none")
        if source == "views":
            fields["tokens"] = VIEW_TOKENS
        got, inter = self._features(IMAGE, ids, views, self._image_starts, fields, keep_fp16)
        return ImageFeatures(**got, grid=self.token_grid(tokens) if source else None, intermediates=inter)

    def texts(self, idx: Any, keep_fp16: bool = False) -> TextFeatures:
        """The teacher's caption features of global caption indices: ``embed`` [B, D], ``tokens``
        [B, L, C], ``mask`` [B, L] bool (+ ``token_index`` [B, K] for top-k storage),
        ``intermediates`` (``text.<i>`` -> [B, C]) (``keep_fp16`` as in :meth:`images`)."""
        ids = _as_index(idx, self.num_captions, "caption")
        fields = tower_arrays(TEXT, self.storage["text_tokens"])
        got, inter = self._features(TEXT, ids, None, self._caption_starts, fields, keep_fp16)
        return TextFeatures(**got, intermediates=inter)

    def targets(self, image_index: Any, caption_index: Any, view: int | Sequence[int] | Tensor = 0,
                keep_fp16: bool = False, tokens: str = "auto") -> TeacherTargets:
        """The teacher targets of a batch of (image view, caption) rows: :meth:`images`,
        :meth:`texts`, the teacher's logit scale and the caption-mean target (:meth:`caption_mean`)."""
        return TeacherTargets(self.images(image_index, view, keep_fp16, tokens=tokens),
                              self.texts(caption_index, keep_fp16), self.logit_scale, self.caption_mean(image_index))

    def caption_mean(self, image_index: Any) -> Tensor:
        """[B, D] float32: the L2-normalised mean of the cached teacher embeddings of ALL captions of
        each image (``offsets``); only the embedding rows are read, never the caption tokens."""
        image_index = _as_index(image_index, self.num_images, "image")
        starts, counts = self.offsets[image_index], np.diff(self.offsets)[image_index]
        rows = np.repeat(np.arange(len(image_index)), counts)
        captions = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        embeds = self._gather(captions, None, self._caption_starts, {"embed": field_array(TEXT, "embed")})["embed"]
        sums = torch.zeros(len(image_index), embeds.shape[1]).index_add_(0, torch.from_numpy(rows), embeds)
        return torch.nn.functional.normalize(sums, dim=-1)

    def _features(self, tower: str, ids: np.ndarray, views: np.ndarray | None, starts: np.ndarray,
                  fields: dict[str, str], keep_fp16: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(feature field -> rows of its array, layer -> rows of the intermediate arrays of ``tower``)."""
        layers = {layer: inter_array(layer) for layer in self.intermediate_layers if layer_tower(layer) == tower}
        got = self._gather(ids, views, starts, {**fields, **layers}, keep_fp16)
        return {f: got[f] for f in fields}, {layer: got[layer] for layer in layers}

    def token_source(self, tokens: str = "auto", views: np.ndarray | None = None) -> str | None:
        """Which image tokens :meth:`images` returns: ``"full"`` (``image_tokens``, the
        ``--image-tokens`` storage), ``"views"`` (``image_view_tokens``: every view pooled to the
        ``--view-tokens grid:<g>`` grid) or None (no tokens). ``tokens="full"`` asks for the
        full tokens (an error for views >= 1 they were not stored for), ``"auto"`` for the tokens of
        every view: the full ones unless the cache was written with ``--view-tokens grid|none``."""
        if tokens not in ("auto", "full"):
            raise ConfigError(f"tokens must be auto or full, not {tokens!r}")
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
        if not self._arrays or VIEW_PARTNER not in self._arrays[0]:
            from distill.core.data.mixup import NO_MIX

            return np.full(len(ids), -1, dtype=np.int64), np.tile(NO_MIX, (len(ids), 1))
        got = self._gather(ids, views, self._image_starts, {"partner": VIEW_PARTNER, "mix": VIEW_MIX})
        return got["partner"].numpy(), got["mix"].numpy()

    def pixels(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> Tensor:
        """uint8 [B, S, S, 3] student crops of the cached views (``--pixels S``, raw format)."""
        if self.pixel_format != "raw":
            raise CacheError(f"{self.path}: the cache holds no raw pixels (written without --pixels or with "
                             f"--pixel-format {self.pixel_format})")
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        return self._gather(ids, views, self._image_starts, {"pixels": PIXELS})["pixels"]

    def jpeg(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> tuple[Tensor, Tensor]:
        """(concatenated JPEG bytes uint8 [sum of lengths], lengths int64 [B]) of the cached views
        (``--pixels S --pixel-format jpeg``), in the order of ``idx``."""
        if self.pixel_format != "jpeg":
            raise CacheError(f"{self.path}: the cache holds no JPEG pixels (written without --pixels or with "
                             f"--pixel-format {self.pixel_format})")
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        index = self._gather(ids, views, self._image_starts, {"index": JPEG_INDEX})["index"].numpy()
        shard_of = np.searchsorted(self._image_starts, ids, side="right") - 1
        parts = [self._arrays[s][JPEG][a:a + n] for s, (a, n) in zip(shard_of, index)]
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(index[:, 1].copy())

    def view_params(self, idx: Any, view: int | Sequence[int] | Tensor = 0) -> Tensor:
        """[B, 5] float32 (top, left, height, width, flip) of the cached views."""
        ids = _as_index(idx, self.num_images, "image")
        views = np.broadcast_to(_as_index(view, self.num_views, "view"), ids.shape)
        return self._gather(ids, views, self._image_starts, {"params": VIEW_PARAMS})["params"]

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
            dtype = np.dtype(array_spec(name).dtype)
            if dtype == np.float32 and keep_fp16 and name in self._fp16:
                dtype = np.dtype(np.float16)
            target = np.empty([len(ids), *self._row_shapes[name]], dtype=dtype)
            for sel in groups:
                si = int(shard_of[sel[0]])
                arrays = self._arrays[si]
                if self.verify == "lazy" and (si, name) not in self._hashed:
                    self._hash_once(si, name)
                src, scale = arrays[name], arrays.get(scale_array(name))
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
