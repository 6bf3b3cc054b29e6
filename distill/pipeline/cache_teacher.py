"""Precompute a frozen teacher's outputs for a dataset into a sharded, resumable cache.

``python -m distill.cache_teacher --teacher openclip:ViT-B-32:laion2b_s34b_b79k --data DATA --out DIR``
(see ``--help`` and README.md, Design > Cache format). Shards are written to a temporary directory
and renamed when complete, so rerunning an interrupted command continues where it stopped and
produces the same bytes as an uninterrupted run; under ``torchrun`` rank r writes shards r, r+W, ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from distill.core.data.augment import sample_view_params
from distill.pipeline.cli import ArgumentParser, cli_main
from distill.core.registry import load_plugins
from distill.core.cache.reader import FORMAT_VERSION, MANIFEST, OFFSETS, SHARD_JSON, TeacherCache, check_file, fsync_dir, read_manifest
from distill.core.errors import BadSampleError, CacheError, CacheMismatchError, CacheVerifyError, CacheWriteError, ConfigError
from distill.pipeline.train.config import Setting, check_args
from distill.core.data.dataset import ImageTextDataset
from distill.core.data.factory import load_dataset
from distill.core.dist import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from distill.core.data.mixup import NO_MIX, sample_mix_params, view_image
from distill.core.data.pixels import PixelSettings, crop_pixels, encode_jpeg, pack_jpeg
from distill.core.cache.lock import writer_lock
from distill.core.cache.output_check import NONFINITE_MODES, OVERFLOW_MODES, ShardOutputs, stored_in_fp16
from distill.core.data.formats.webdataset import samples_per_shard
from distill.core.cache.encode import TokenMode, parse_token_mode, pool_grid, quantize_int8, topk_tokens
from teachers import Teacher, create_teacher

Arrays = dict[str, np.ndarray]
#: Estimated shard bytes above which the size report suggests a smaller ``--shard-size``.
SHARD_MEMORY_WARN = 2e9


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides teacher and dataset that determines the cache bytes."""

    image_tokens: TokenMode = TokenMode("full")
    text_tokens: TokenMode = TokenMode("full")
    dtype: str = "fp16"
    layers: tuple[str, ...] = ()
    views: int = 1
    view_seed: int = 0
    view_scale: tuple[float, float] = (0.5, 1.0)
    shard_size: int = 1024
    view_tokens: str = "same"  # image tokens of views >= 1: same | none | grid:<g>
    mixup_views: int = 0
    mixup_alpha: float = 1.0
    pixels: PixelSettings | None = None

    @property
    def total_views(self) -> int:
        """Cached views per image: ``views`` plain views followed by ``mixup_views`` mixup views."""
        return self.views + self.mixup_views

    @property
    def image_layers(self) -> list[int]:
        return [int(n.split(".")[1]) for n in self.layers if n.startswith("image.")]

    @property
    def text_layers(self) -> list[int]:
        return [int(n.split(".")[1]) for n in self.layers if n.startswith("text.")]

    def storage_json(self) -> dict[str, Any]:
        out = {"image_tokens": str(self.image_tokens), "text_tokens": str(self.text_tokens), "dtype": self.dtype,
               "intermediate_layers": list(self.layers)}
        if self.view_tokens != "same":
            out["view_tokens"] = self.view_tokens
        if self.pixels is not None:
            out["pixels"] = self.pixels.to_json()
        return out

    def views_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.total_views, "seed": self.view_seed, "scale": list(self.view_scale)}
        if self.mixup_views:
            out.update(plain=self.views, mixup=self.mixup_views, mixup_alpha=self.mixup_alpha)
        return out

    def key(self) -> str:
        blob = {"storage": self.storage_json(), "views": self.views_json(), "shard_size": self.shard_size}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    index: int
    image_range: tuple[int, int]
    caption_range: tuple[int, int]

    @property
    def dir(self) -> str:
        return f"shards/{self.index:05d}"

    @property
    def num_images(self) -> int:
        return self.image_range[1] - self.image_range[0]


@dataclass
class WriteStats:
    computed_shards: int = 0
    reused_shards: int = 0
    computed_images: int = 0


def plan_shards(offsets: np.ndarray, shard_size: int) -> list[ShardPlan]:
    """Split images into shards of ``shard_size`` (the last one shorter) with their captions."""
    n = len(offsets) - 1
    return [ShardPlan(i, (a, min(a + shard_size, n)), (int(offsets[a]), int(offsets[min(a + shard_size, n)])))
            for i, a in enumerate(range(0, n, shard_size))]


def image_view_params(index: int, settings: CacheSettings) -> np.ndarray:
    """[V, 5] view parameters of a global image index; independent of sharding and ranks."""
    rng = np.random.default_rng([settings.view_seed, index])
    return sample_view_params(rng, settings.total_views, tuple(settings.view_scale))


def image_mix_params(index: int, settings: CacheSettings, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(partner [V] int64, mix [V, 6] float32) of a global image index (see :mod:`distill.core.data.mixup`):
    -1 / :data:`NO_MIX` for the plain views; independent of sharding and ranks."""
    partner = np.full(settings.total_views, -1, dtype=np.int64)
    mix = np.tile(NO_MIX, (settings.total_views, 1))
    if settings.mixup_views:
        rng = np.random.default_rng([settings.view_seed, index, 1])
        partner[settings.views:], mix[settings.views:] = sample_mix_params(
            rng, index, num_images, settings.mixup_views, settings.mixup_alpha, tuple(settings.view_scale))
    return partner, mix


class ViewImages(Dataset):
    """Decodes image i and returns (i, [V, 3, H, W] teacher inputs, [V, 5] params, error or None,
    extras: mixup partner/mix params and the student pixels of each view when cached)."""

    def __init__(self, ds: ImageTextDataset, transform: Callable[[Image.Image], Tensor], settings: CacheSettings) -> None:
        self.ds, self.transform, self.settings = ds, transform, settings

    def __len__(self) -> int:
        return self.ds.num_images

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, np.ndarray, str | None, dict[str, Any]]:
        params = image_view_params(i, self.settings)
        partner, mix = image_mix_params(i, self.settings, self.ds.num_images)
        extra: dict[str, Any] = {"partner": partner, "mix": mix}
        load = functools.lru_cache(maxsize=4)(self.ds.load_image)
        try:
            views = [view_image(load, i, p, int(j), m) for p, j, m in zip(params, partner, mix)]
        except BadSampleError as e:
            return i, None, params, str(e), extra
        px = self.settings.pixels
        if px is not None:
            crops = [crop_pixels(v, px.size) for v in views]
            extra["pixels"] = np.stack(crops) if px.format == "raw" else [encode_jpeg(c, px.quality) for c in crops]
        return i, torch.stack([self.transform(v) for v in views]), params, None, extra


def collate_views(items: list[tuple[int, Tensor | None, np.ndarray, str | None, dict[str, Any]]]
                  ) -> tuple[list[int], Tensor | None, np.ndarray, str | None, dict[str, Any]]:
    errors = [it[3] for it in items if it[3]]
    pixels = None if errors else torch.stack([it[1] for it in items])
    extra: dict[str, Any] = {}
    for key in items[0][4]:
        values = [it[4].get(key) for it in items]
        extra[key] = values if isinstance(values[0], list) or any(v is None for v in values) else np.stack(values)
    return [it[0] for it in items], pixels, np.stack([it[2] for it in items]), (errors[0] if errors else None), extra


# -- feature post-processing -------------------------------------------------------------------
def _store_tokens(tokens: Tensor, dtype: str, prefix: str) -> Arrays:
    if dtype == "int8":
        q, scale = quantize_int8(tokens)
        return {prefix: q.cpu().numpy(), f"{prefix}_scale": scale.cpu().numpy().astype(np.float32)}
    return {prefix: tokens.float().cpu().numpy()}  # fp16 cast (and range check) in ShardOutputs


def image_arrays(teacher: Teacher, pixels: Tensor, settings: CacheSettings, amp: bool) -> tuple[Arrays, tuple[int, int] | None]:
    """Encode [n, V, 3, H, W] pixels; returns arrays with leading [n, V] and the stored token grid
    (float outputs in float32; :class:`ShardOutputs` checks and casts them for storage)."""
    n, v = pixels.shape[:2]
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        f = teacher.encode_image(pixels.flatten(0, 1).to(device), layers=settings.image_layers)
    out: Arrays = {"image_embed": f.embed.float().cpu().numpy()}
    for name, x in f.intermediates.items():
        out[f"inter_{name}"] = x.float().cpu().numpy()
    mode, grid = settings.image_tokens, None
    if mode.kind != "none":
        if f.tokens is None:
            raise ValueError(f"teacher {teacher.spec} returns no image tokens; use --image-tokens none")
        tokens = f.tokens.float()
        if mode.kind == "full":
            grid = f.grid
        elif mode.kind == "grid":
            tokens, grid = pool_grid(tokens, f.grid, mode.k), (mode.k, mode.k)
        else:
            tokens, index = topk_tokens(tokens, min(mode.k, tokens.shape[1]))
            out["image_tokens_index"] = index.cpu().numpy().astype(np.int16)
        out.update(_store_tokens(tokens, settings.dtype, "image_tokens"))
    out = {k: a.reshape(n, v, *a.shape[1:]) for k, a in out.items()}
    if v > 1 and settings.view_tokens != "same" and mode.kind != "none":
        out.update(view_token_arrays(out, f.tokens, f.grid, settings, n, v))
    return out, grid


def view_token_arrays(out: Arrays, tokens: Tensor, grid: tuple[int, int] | None, settings: CacheSettings,
                      n: int, v: int) -> Arrays:
    """``--view-tokens none|grid:<g>``: keep the ``--image-tokens`` arrays of view 0 only (trimming
    ``out`` in place) and, for ``grid:<g>``, add ``image_view_tokens`` [n, V, g*g, C] (all views,
    pooled from the teacher's full token grid; ``_scale`` too when int8)."""
    for name in [k for k in out if k.startswith("image_tokens")]:
        out[name] = out[name][:, :1]
    if settings.view_tokens == "none":
        return {}
    g = parse_token_mode(settings.view_tokens).k
    pooled = _store_tokens(pool_grid(tokens.float(), grid, g), settings.dtype, "image_view_tokens")
    return {k: a.reshape(n, v, *a.shape[1:]) for k, a in pooled.items()}


def text_arrays(teacher: Teacher, captions: Sequence[str], settings: CacheSettings, amp: bool) -> Arrays:
    """Tokenise and encode captions; token arrays are [m, L, ...] with this batch's L."""
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    batch = {k: v.to(device) for k, v in teacher.tokenize(list(captions)).items()}
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        f = teacher.encode_text(batch, layers=settings.text_layers)
    out: Arrays = {"text_embed": f.embed.float().cpu().numpy()}
    for name, x in f.intermediates.items():
        out[f"inter_{name}"] = x.float().cpu().numpy()
    mode = settings.text_tokens
    if mode.kind != "none":
        if f.tokens is None:
            raise ValueError(f"teacher {teacher.spec} returns no text tokens; use --text-tokens none")
        tokens = f.tokens.float()
        mask = f.mask.bool() if f.mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if mode.kind == "topk":
            short = max(0, mode.k - tokens.shape[1])
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, short))
            mask = torch.nn.functional.pad(mask, (0, short), value=False)
            tokens, index = topk_tokens(tokens, mode.k, mask)
            mask = torch.gather(mask, 1, index)
            out["text_tokens_index"] = index.cpu().numpy().astype(np.int16)
        out.update(_store_tokens(tokens, settings.dtype, "text_tokens"))
        out["text_mask"] = mask.cpu().numpy().astype(np.uint8)
    return out


def concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, zero-padding axis 1 (caption length) to the longest part."""
    if parts[0].ndim < 2 or len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts])


# -- shard files ---------------------------------------------------------------------------------
class _HashingWriter:
    """File-like object that hashes and counts what ``np.save`` writes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def save_array(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Write ``arr`` as .npy, fsync it, and return its ``{shape, dtype, bytes, sha256}`` record."""
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        np.save(w, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": w.bytes, "sha256": w.sha.hexdigest()}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync and rename over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_advice(e: OSError) -> str:
    """What to do after an OSError while writing the cache, by its cause."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or raise the quota) and rerun the same command to resume"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the --out folder writable (or choose another --out) and rerun the same command to resume"
    if e.errno == errno.ENOENT:
        return ("a file vanished while writing (was the folder changed or removed by another process?); "
                "rerun the same command to resume")
    return "fix the cause above and rerun the same command to resume"


def write_shard(out: Path, plan: ShardPlan, arrays: Arrays, meta: dict[str, Any], rank: int,
                encodings: dict[str, str] | None = None) -> None:
    """Write a shard into ``<dir>.tmp-<rank>-<pid>`` and rename it into place; on failure the
    temporary directory is removed and :class:`CacheWriteError` names the shard. ``encodings``
    marks arrays stored as bit patterns (``{"image_tokens": "bfloat16"}``) in their records."""
    final = out / plan.dir
    tmp = final.with_name(f"{final.name}.tmp-{rank}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        records = {name: save_array(tmp / f"{name}.npy", arrays[name]) for name in sorted(arrays)}
        for name, encoding in (encodings or {}).items():
            records[name]["encoding"] = encoding
        write_json_atomic(tmp / SHARD_JSON, {**meta, "index": plan.index, "dir": plan.dir,
                                            "image_range": list(plan.image_range),
                                            "caption_range": list(plan.caption_range), "arrays": records})
        fsync_dir(tmp)
        if final.exists():  # a stale/incomplete shard of an earlier run: replaced only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CacheWriteError(f"writing shard {final} failed: {e}. Completed shards are intact; {write_advice(e)}") from e
        raise


def read_shard_json(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SHARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shard_is_complete(out: Path, plan: ShardPlan, info: dict[str, Any] | None, source: dict[str, str],
                      rehash: bool, image_stats: str | None = None, nonfinite: str = "report") -> bool:
    """Whether the shard on disk belongs to this run and all its files have the recorded size
    (and sha256 when ``rehash``); with ``image_stats`` also that its images have the recorded
    size/mtime digest, and with ``nonfinite="error"`` that it holds no reported non-finite values."""
    if info is None or info.get("source") != source or info.get("index") != plan.index \
            or info.get("image_range") != list(plan.image_range) or info.get("caption_range") != list(plan.caption_range):
        return False
    if image_stats is not None and info.get("image_stats") != image_stats:
        return False
    checks = info.get("output_check") if isinstance(info.get("output_check"), dict) else {}
    if nonfinite == "error" and any(isinstance(c, dict) and c.get("nonfinite") for c in checks.values()):
        return False
    try:
        for name, entry in info["arrays"].items():
            check_file(out / plan.dir / f"{name}.npy", entry, "full" if rehash else "size")
    except (CacheError, KeyError, TypeError):
        return False
    return True


def _describe_mismatch(old: dict[str, str], new: dict[str, str]) -> str:
    what = {"teacher": "teacher (config_hash)", "dataset": "dataset (fingerprint)", "settings": "storage/view/shard settings"}
    return "; ".join(f"{what[k]} {old.get(k, '?')[:12]} != {new[k][:12]}" for k in new if old.get(k) != new[k])


def check_existing(out: Path, source: dict[str, str]) -> None:
    """Raise :class:`CacheMismatchError` if ``out`` holds a manifest or shards of another teacher,
    dataset or storage setting."""
    found: list[tuple[Path, dict[str, str]]] = []
    if (out / MANIFEST).is_file():
        try:
            found.append((out / MANIFEST, read_manifest(out)["source"]))
        except (CacheError, KeyError):
            print(f"warning: ignoring unreadable {out / MANIFEST}; it will be rewritten", file=sys.stderr)
    shards = out / "shards"
    for folder in sorted(shards.iterdir()) if shards.is_dir() else []:
        info = read_shard_json(folder) if ".tmp-" not in folder.name else None
        if info is not None and "source" in info:
            found.append((folder / SHARD_JSON, info["source"]))
    for path, old in found:
        if old != source:
            raise CacheMismatchError(f"{out} already holds a different cache ({path}: {_describe_mismatch(old, source)}). "
                                     "Pass --overwrite to replace it or choose another --out")


def clear_cache(out: Path) -> None:
    """Remove the files a previous cache left in ``out`` (only ours: manifest, offsets, shards)."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in (MANIFEST, OFFSETS, MANIFEST + ".tmp", OFFSETS + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for tmp in [*out.glob(MANIFEST + ".tmp-*"), *out.glob(OFFSETS + ".tmp-*")]:
        tmp.unlink(missing_ok=True)


def estimate_cache_size(teacher: Teacher, ds: ImageTextDataset, settings: CacheSettings) -> dict[str, float]:
    """Bytes per array of the whole cache, extrapolated from the arrays of image 0 (all its views)
    and its captions (text token arrays are padded per batch, JPEG sizes vary: an estimate)."""
    item = ViewImages(ds, teacher.image_transform(), settings)[0]
    _, pixels, params, error, extra = collate_views([item])
    if error:
        raise BadSampleError(error)
    jpeg: list[list[np.ndarray]] = []
    with torch.inference_mode():
        image, _ = image_arrays(teacher, pixels, settings, amp=False)
        image.update(view_extra_arrays(extra, settings, jpeg), view_params=params.astype(np.float32))
        if jpeg:
            image.update(pack_jpeg(jpeg))
        caps = ds.captions[int(ds.offsets[0]):int(ds.offsets[1])]
        text = text_arrays(teacher, caps, settings, amp=False)
    def stored(name: str, a: np.ndarray) -> float:  # float outputs are cast to fp16 by ShardOutputs
        return float(a.nbytes) / (2 if a.dtype == np.float32 and stored_in_fp16(name) else 1)

    sizes = {k: stored(k, a) * ds.num_images for k, a in image.items()}
    sizes.update({k: stored(k, a) / len(caps) * ds.num_captions for k, a in text.items()})
    return sizes


def print_size_estimate(sizes: dict[str, float], ds: ImageTextDataset, settings: CacheSettings) -> None:
    """One stderr line per array and the total, printed before any shard is written."""
    total = sum(sizes.values())
    print(f"estimated cache size: {total / 1e6:.2f} MB for {ds.num_images} images x {settings.total_views} views "
          f"({settings.views} plain + {settings.mixup_views} mixup), {ds.num_captions} captions "
          f"({total / max(ds.num_images, 1) / 1e3:.1f} kB per image with its captions)", file=sys.stderr)
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {size / 1e6:10.2f} MB", file=sys.stderr)
    shard = total / max(ds.num_images, 1) * min(settings.shard_size, ds.num_images)
    if shard > SHARD_MEMORY_WARN:
        print(f"warning: a shard ({min(settings.shard_size, ds.num_images)} images) is held in memory while it is "
              f"computed: ~{shard / 1e6:.0f} MB; pass a smaller --shard-size (e.g. "
              f"{max(1, int(settings.shard_size * SHARD_MEMORY_WARN / shard))}) to bound it", file=sys.stderr)


# -- the writer ----------------------------------------------------------------------------------
def compute_shard(teacher: Teacher, ds: ImageTextDataset, plan: ShardPlan, batches: Any, settings: CacheSettings,
                  batch_size: int, amp: bool, progress: tqdm, caption_progress: tqdm | None = None,
                  outputs: ShardOutputs | None = None) -> tuple[Arrays, tuple[int, int] | None]:
    """Consume this shard's image batches from the loader iterator and encode its captions
    (``outputs`` counts non-finite / fp16-overflowing values and casts; :meth:`ShardOutputs.check`
    is left to the caller)."""
    outputs = outputs if outputs is not None else ShardOutputs(plan.dir)
    parts = outputs.parts
    grid = None
    params: list[np.ndarray] = []
    jpeg: list[list[np.ndarray]] = []
    for _ in range(0, plan.num_images, batch_size):
        idx, pixels, view_params, error, extra = next(batches)
        if error:
            raise BadSampleError(error)
        arrays, grid = image_arrays(teacher, pixels, settings, amp)
        arrays.update(view_extra_arrays(extra, settings, jpeg))
        params.append(view_params.astype(np.float32))
        outputs.add(arrays)
        progress.update(len(idx))
    a, b = plan.caption_range
    for start in range(a, b, batch_size):
        outputs.add(text_arrays(teacher, ds.captions[start:min(start + batch_size, b)], settings, amp))
        if caption_progress is not None:
            caption_progress.update(min(start + batch_size, b) - start)
    out = {k: concat_padded(v) for k, v in parts.items()}
    out["view_params"] = np.concatenate(params)
    if settings.pixels is not None and settings.pixels.format == "jpeg":
        out.update(pack_jpeg(jpeg))
    return out, grid


def view_extra_arrays(extra: dict[str, Any], settings: CacheSettings, jpeg: list[list[np.ndarray]]) -> Arrays:
    """Per-batch arrays besides the teacher outputs: mixup parameters (``view_params_partner``,
    ``view_params_mix``) and raw student pixels (``image_pixels`` [n, V, S, S, 3] uint8); JPEG bytes
    are collected into ``jpeg`` and packed per shard."""
    out: Arrays = {}
    if settings.mixup_views:
        out["view_params_partner"] = np.asarray(extra["partner"], dtype=np.int64)
        out["view_params_mix"] = np.asarray(extra["mix"], dtype=np.float32)
    if settings.pixels is not None:
        if settings.pixels.format == "raw":
            out["image_pixels"] = np.asarray(extra["pixels"], dtype=np.uint8)
        else:
            jpeg.extend(extra["pixels"])
    return out


def write_shards(teacher: Teacher, ds: ImageTextDataset, out: Path, settings: CacheSettings, source: dict[str, str],
                 info: DistInfo, batch_size: int = 64, num_workers: int = 2, amp: bool = False,
                 rehash_existing: bool = False, nonfinite: str = "error", overflow: str = "error") -> WriteStats:
    """Compute this rank's missing shards (r, r+W, ...), reusing complete ones on disk (a shard
    whose image files changed size/mtime since it was written is stale and recomputed)."""
    stats = WriteStats()
    todo: list[ShardPlan] = []
    image_stats: dict[int, str] = {}
    for plan in plan_shards(ds.offsets, settings.shard_size)[info.rank::info.world_size]:
        folder = out / plan.dir
        for stale in folder.parent.glob(f"{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        image_stats[plan.index] = ds.stats_digest(*plan.image_range)  # before reading: a later change is seen
        if shard_is_complete(out, plan, read_shard_json(folder), source, rehash_existing, image_stats[plan.index],
                             nonfinite):
            stats.reused_shards += 1
            continue
        todo.append(plan)  # an old folder stays until its replacement is complete (write_shard)
    batches = [list(range(s, min(s + batch_size, p.image_range[1]))) for p in todo for s in range(*p.image_range, batch_size)]
    loader = DataLoader(ViewImages(ds, teacher.image_transform(), settings), batch_sampler=batches,
                        num_workers=num_workers if batches else 0, collate_fn=collate_views)
    progress = tqdm(total=sum(p.num_images for p in todo), unit="img", disable=not info.is_main, desc="caching",
                    file=sys.stderr, dynamic_ncols=True)
    captions = tqdm(total=sum(p.caption_range[1] - p.caption_range[0] for p in todo), unit="caption", position=1,
                    disable=not info.is_main, desc="captions", file=sys.stderr, dynamic_ncols=True)
    it = iter(loader)
    with torch.inference_mode(), progress, captions:
        for plan in todo:
            outputs = ShardOutputs(str(out / plan.dir), nonfinite, overflow)
            arrays, grid = compute_shard(teacher, ds, plan, it, settings, batch_size, amp, progress, captions, outputs)
            meta = {"source": source, "image_grid": list(grid) if grid else None,
                    "image_stats": image_stats[plan.index], "output_check": outputs.check()}
            write_shard(out, plan, arrays, meta, info.rank, outputs.encodings())
            stats.computed_shards += 1
            stats.computed_images += plan.num_images
    return stats


def write_manifest(teacher: Teacher, ds: ImageTextDataset, out: Path, settings: CacheSettings, source: dict[str, str],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Collect every shard.json (all ranks) into manifest.json and write offsets.npy."""
    shards = []
    for plan in plan_shards(ds.offsets, settings.shard_size):
        info = read_shard_json(out / plan.dir)
        if info is None or info.get("source") != source:
            raise CacheWriteError(f"shard {out / plan.dir} is missing or incomplete after all ranks finished")
        shards.append({k: v for k, v in info.items() if k != "source"})
    first = shards[0]["arrays"]
    dims = {"embed": first["image_embed"]["shape"][-1], "image_grid": shards[0]["image_grid"],
            "image_tokens": first["image_tokens"]["shape"][2:] if "image_tokens" in first else None,
            "text_tokens": [max(s["arrays"]["text_tokens"]["shape"][1] for s in shards), first["text_tokens"]["shape"][2]]
            if "text_tokens" in first else None}
    if "image_view_tokens" in first:
        g = parse_token_mode(settings.view_tokens).k
        dims.update(view_tokens=first["image_view_tokens"]["shape"][2:], view_token_grid=[g, g])
    if settings.pixels is not None:
        dims["pixels"] = [settings.pixels.size, settings.pixels.size, 3]
    try:
        tmp = out / f"{OFFSETS}.tmp-{os.getpid()}"
        offsets_record = save_array(tmp, ds.offsets)
        os.replace(tmp, out / OFFSETS)
        manifest = {
            "format_version": FORMAT_VERSION, "source": source,
            "teacher": {"spec": teacher.spec, "config_hash": source["teacher"], "config": teacher.config(),
                        "logit_scale": float(teacher.logit_scale)},
            "dataset": {"name": ds.name, "split": ds.split, "root": str(ds.root), "fingerprint": source["dataset"],
                        "num_images": ds.num_images, "num_captions": ds.num_captions,
                        "skipped": [{"where": s.where, "reason": s.reason} for s in ds.skipped]},
            "storage": settings.storage_json(), "views": settings.views_json(), "shard_size": settings.shard_size,
            "offsets": offsets_record, "shards": shards, "dims": dims, **extra}
        write_json_atomic(out / MANIFEST, manifest)
        fsync_dir(out)
    except OSError as e:
        raise CacheWriteError(f"writing {out / MANIFEST} failed: {e}; rerun the same command to finish") from e
    return manifest


def report_output_checks(manifest: dict[str, Any]) -> None:
    """Print the stored non-finite counts and widened arrays of a cache to stderr (nothing if clean)."""
    totals: dict[str, dict[str, int]] = {}
    widened: dict[str, set[str]] = {}
    for s in manifest["shards"]:
        for name, c in (s.get("output_check") or {}).items():
            t = totals.setdefault(name, {"nonfinite": 0, "overflow": 0})
            t["nonfinite"] += c.get("nonfinite", 0)
            t["overflow"] += c.get("overflow", 0)
            if c.get("stored_as"):
                widened.setdefault(name, set()).add(c["stored_as"])
    bad = {n: t["nonfinite"] for n, t in totals.items() if t["nonfinite"]}
    if bad:
        print("warning: stored non-finite teacher outputs (--nonfinite report): "
              + ", ".join(f"{n} {k}" for n, k in bad.items()), file=sys.stderr)
    if widened:
        print("note: fp16 overflow, stored wider: " + ", ".join(
            f"{n} ({totals[n]['overflow']} values; {'/'.join(sorted(w))})" for n, w in widened.items()), file=sys.stderr)


def _cosines(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12)


def verify_cache(out: Path, teacher: Teacher, ds: ImageTextDataset, n: int, seed: int = 0,
                 threshold: float = 0.999) -> dict[str, float]:
    """Recompute ``n`` random images (all views) and their captions with the teacher and require
    cosine >= ``threshold`` for the embeddings and, with ``full`` token storage, for the tokens
    (``0.99`` when int8-quantised). Raises :class:`CacheVerifyError`; returns the minimum cosines."""
    cache = TeacherCache(out)
    ids = np.sort(np.random.default_rng(seed).choice(cache.num_images, size=min(n, cache.num_images), replace=False))
    transform = teacher.image_transform()
    device = next(iter(teacher.parameters()), torch.empty(0)).device
    token_thr = threshold if cache.storage["dtype"] == "fp16" else 0.99
    worst: dict[str, float] = {}

    def compare(what: str, cached: Tensor, fresh: Tensor, thr: float, names: list[str]) -> None:
        cos = _cosines(cached, fresh.float().cpu())
        worst[what] = float(cos.min())  # NaN when any row is NaN
        bad = torch.nonzero(~(cos >= thr)).flatten()  # NaN compares False: a failure
        if len(bad):
            k = int(bad[cos[bad].nan_to_num(-2.0).argmin()])  # a NaN row first, else the worst
            raise CacheVerifyError(f"{out}: cached {what} of {names[k]} differs from the teacher's output "
                                   f"(cosine {cos[k]:.5f} < {thr}); the cache is stale or corrupt")

    with torch.inference_mode():
        for v in range(cache.num_views):
            params = cache.view_params(ids, v).numpy()
            partner, mix = cache.view_mix(ids, v)
            views = [view_image(ds.load_image, int(i), p, int(j), m) for i, p, j, m in zip(ids, params, partner, mix)]
            pixels = torch.stack([transform(img) for img in views])
            f = teacher.encode_image(pixels.to(device))
            full_tokens = v == 0 or cache.storage.get("view_tokens", "same") == "same"
            got = cache.images(ids, v, tokens="full" if full_tokens else "auto")
            names = [f"image {i} view {v} ({ds.images[i]})" for i in ids]
            compare("image embed", got["embed"], f.embed, threshold, names)
            if cache.storage["image_tokens"] == "full" and full_tokens:
                compare("image tokens", got["tokens"], f.tokens, token_thr, names)
            if cache.pixel_format is not None:
                verify_pixels(cache, ids, v, views, names)
        caps = np.concatenate([np.arange(cache.offsets[i], cache.offsets[i + 1]) for i in ids])
        t = teacher.encode_text({k: x.to(device) for k, x in teacher.tokenize([ds.captions[c] for c in caps]).items()})
        got = cache.texts(caps)
        names = [f"caption {c} ({ds.captions[c]!r})" for c in caps]
        compare("text embed", got["embed"], t.embed, threshold, names)
        if cache.storage["text_tokens"] == "full":
            mask = t.mask.cpu() if t.mask is not None else torch.ones(t.tokens.shape[:2], dtype=torch.bool)
            fresh = t.tokens.float().cpu() * mask.unsqueeze(-1)
            cached = got["tokens"][:, : fresh.shape[1]] * got["mask"][:, : fresh.shape[1]].unsqueeze(-1)
            compare("text tokens", cached, fresh, token_thr, names)
    return worst


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
    teacher's token grid (pooling would upsample)."""
    device = next(iter(teacher.parameters()), torch.empty(0)).device
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
        if mode.kind == "grid":
            grid = teacher.encode_image(pixels).grid
            if grid and mode.k > min(grid):
                raise ConfigError(f"--image-tokens grid:{mode.k} is larger than the teacher's {grid[0]}x{grid[1]} "
                                  f"token grid; pooling cannot add tokens. Use grid:<g> with g <= {min(grid)} or full")


def verify_pixels(cache: TeacherCache, ids: np.ndarray, view: int, views: list[Image.Image], names: list[str]) -> None:
    """Cached student pixels of ``view`` must equal the rebuilt crops (raw: exactly; JPEG: the
    decoded bytes equal the decoded re-encoding of the rebuilt crop to within 1 grey level on average)."""
    from distill.core.data.pixels import decode_jpeg_batch

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


# -- CLI -----------------------------------------------------------------------------------------
def parse_layers(items: Sequence[str]) -> tuple[str, ...]:
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    for n in names:
        tower, _, i = n.partition(".")
        if tower not in ("image", "text") or not i.isdigit():
            raise ValueError(f"--layers entry {n!r} must look like image.<i> or text.<i>")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m distill.cache_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher spec, e.g. openclip:ViT-B-32:laion2b_s34b_b79k")
    p.add_argument("--data", required=True, help="dataset: CSV/TSV, Karpathy/COCO JSON, a Flickr8k folder or "
                   "webdataset shards ('shards/{000..009}.tar')")
    p.add_argument("--split", default=None, help="split to cache (train/val/test); default: all rows")
    p.add_argument("--images-root", default=None, help="folder image paths are relative to (default: next to --data)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--batch-size", type=int, default=64, help="images (and captions) per teacher forward")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard (default: 1024; for webdataset input the samples per tar shard)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast for the teacher (CUDA only)")
    p.add_argument("--image-tokens", default="full", help="full | grid:<g> | topk:<k> | none")
    p.add_argument("--text-tokens", default="full", help="full | topk:<k> | none")
    p.add_argument("--dtype", choices=("fp16", "int8"), default="fp16", help="token storage type")
    p.add_argument("--layers", nargs="*", default=[], help="intermediate layers, e.g. image.3,text.2")
    p.add_argument("--views", type=int, default=1, help="views per image (view 0 is the clean image)")
    p.add_argument("--view-seed", type=int, default=0)
    p.add_argument("--view-scale", default="0.5,1.0", help="min,max crop area fraction of the extra views")
    p.add_argument("--view-tokens", default=None,
                   help="image tokens of views >= 1 (and mixup views): same (as --image-tokens) | grid:<g> "
                        "(all views pooled to g x g, view 0 also kept as --image-tokens) | none "
                        "(view 0 only); default grid:2 when more than one view is cached")
    p.add_argument("--mixup-views", type=int, default=0,
                   help="extra mixup views per image (image blended with another image's view)")
    p.add_argument("--mixup-alpha", type=float, default=1.0, help="mixup weight lam ~ Beta(a, a), folded to >= 0.5")
    p.add_argument("--pixels", type=int, default=0, metavar="SIZE",
                   help="also store every view's student crop at SIZE x SIZE (uint8), so training reads no JPEGs")
    p.add_argument("--pixel-format", choices=("raw", "jpeg"), default="raw",
                   help="raw uint8 pixels or JPEG bytes (decoded in batches on the training device)")
    p.add_argument("--pixel-quality", type=int, default=90, help="JPEG quality of --pixel-format jpeg")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    p.add_argument("--verify", type=int, nargs="?", const=8, default=0, metavar="N",
                   help="recompute N (default 8) random samples and compare (cosine >= 0.999)")
    p.add_argument("--verify-existing", action="store_true",
                   help="re-hash (sha256) shards kept from an earlier run instead of checking sizes only")
    p.add_argument("--plugin", action="append", default=[], help="module to import first (registers teachers)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher/dataset/settings")
    p.add_argument("--nonfinite", choices=NONFINITE_MODES, default="error",
                   help="teacher outputs with NaN/Inf: refuse the shard (error) or store them and record the counts "
                        "in the manifest (report)")
    p.add_argument("--overflow", choices=OVERFLOW_MODES, default="error",
                   help="outputs beyond the fp16 range (|x| > 65504): refuse (error) or store that array of that shard "
                        "in bf16 / fp32")
    return p


#: Value checks of the numeric flags (distill.pipeline.train.config.check_args).
ARG_RULES = (Setting("views", "int", lambda v: v >= 1, "an integer >= 1", "--views"),
             Setting("shard_size", "int", lambda v: v >= 1, "an integer >= 1", "--shard-size", nullable=True),
             Setting("batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--batch-size"),
             Setting("num_workers", "int", lambda v: v >= 0, "an integer >= 0", "--num-workers"),
             Setting("verify", "int", lambda v: v >= 0, "a number of samples >= 0 (0: no check)", "--verify"),
             Setting("mixup_views", "int", lambda v: v >= 0, "an integer >= 0", "--mixup-views"),
             Setting("mixup_alpha", "float", lambda v: v > 0, "a number > 0", "--mixup-alpha"))


def parse_view_scale(text: str) -> tuple[float, float]:
    """``"min,max"`` crop area fractions with 0 < min <= max <= 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--view-scale must be two numbers min,max, got {text!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"--view-scale must be min,max with 0 < min <= max <= 1, got {text!r}")
    return lo, hi


def settings_from_args(args: argparse.Namespace) -> CacheSettings:
    check_args(args, ARG_RULES)
    lo, hi = parse_view_scale(args.view_scale)
    shard_size = 1024 if args.shard_size is None else args.shard_size
    image_tokens = parse_token_mode(args.image_tokens)
    view_tokens = resolve_view_tokens(args.view_tokens, image_tokens, args.views + args.mixup_views)
    pixels = PixelSettings(args.pixels, args.pixel_format, args.pixel_quality) if args.pixels else None
    return CacheSettings(image_tokens, parse_token_mode(args.text_tokens, allow_grid=False),
                         args.dtype, parse_layers(args.layers), args.views, args.view_seed, (lo, hi), shard_size,
                         view_tokens, args.mixup_views, args.mixup_alpha, pixels)


def resolve_view_tokens(spec: str | None, image_tokens: TokenMode, total_views: int) -> str:
    """``--view-tokens``: ``same`` for a single view or without image tokens (nothing to choose),
    ``grid:2`` by default, else the validated spec."""
    if total_views == 1 or image_tokens.kind == "none":
        return "same"
    if spec is None:
        return "grid:2"
    if spec in ("same", "none"):
        return spec
    mode = parse_token_mode(spec)
    if mode.kind != "grid":
        raise ValueError(f"--view-tokens {spec!r} must be same | none | grid:<g>")
    return str(mode)


def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.time()
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    load_plugins(args.plugin)
    info = init_distributed(args.device)
    out = Path(args.out)
    lock = contextlib.ExitStack()
    try:
        teacher = create_teacher(args.teacher, str(info.device))
        probe_teacher(teacher, settings)
        ds = load_dataset(args.data, args.split, args.images_root, on_bad_sample=args.on_bad_sample)
        if info.is_main:  # one writer per folder (the ranks of one torchrun job share it); taken before
            out.mkdir(parents=True, exist_ok=True)  # anything is written, after the inputs are checked
            lock.enter_context(writer_lock(out))
        if ds.skipped and info.is_main:
            print(f"skipped {len(ds.skipped)} bad sample(s):", *(f"  {s.reason}" for s in ds.skipped), sep="\n", file=sys.stderr)
        if args.shard_size is None and samples_per_shard(ds):  # webdataset: one cache shard per tar shard
            settings = dataclasses.replace(settings, shard_size=samples_per_shard(ds))
        source = {"teacher": teacher.config_hash(), "dataset": ds.fingerprint(), "settings": settings.key()}
        if args.overwrite:
            if info.is_main:
                clear_cache(out)
        else:
            check_existing(out, source)
        if info.is_main and ds.num_images:
            print_size_estimate(estimate_cache_size(teacher, ds, settings), ds, settings)
        barrier()
        (out / "shards").mkdir(parents=True, exist_ok=True)
        stats = write_shards(teacher, ds, out, settings, source, info, args.batch_size, args.num_workers, args.amp,
                             args.verify_existing, args.nonfinite, args.overflow)
        counts = all_reduce_mean(torch.tensor([stats.computed_shards, stats.reused_shards], dtype=torch.float64))
        computed, reused = (int(round(float(c) * info.world_size)) for c in counts)
        barrier()
        if info.is_main:
            extra = {"compute": {"batch_size": args.batch_size, "amp": bool(args.amp), "device": info.device.type}}
            manifest = write_manifest(teacher, ds, out, settings, source, extra)
            report_output_checks(manifest)
            if args.verify:
                worst = verify_cache(out, teacher, ds, args.verify)
                print("verify OK: min cosine " + ", ".join(f"{k} {v:.5f}" for k, v in worst.items()), file=sys.stderr)
            size = sum(e["bytes"] for s in manifest["shards"] for e in s["arrays"].values())
            print(f"cached {ds.num_images} images, {ds.num_captions} captions, {len(manifest['shards'])} shards "
                  f"({computed} computed, {reused} reused, {len(ds.skipped)} samples skipped) "
                  f"in {time.time() - t0:.1f} s, {size / 1e6:.1f} MB -> {out}")
        barrier()
    finally:
        lock.close()
        cleanup()
    return 0


if __name__ == "__main__":
    cli_main(main)
