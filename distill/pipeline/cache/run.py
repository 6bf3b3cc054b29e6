"""``run_cache``: the Python API of ``python -m distill.cache_teacher``. The teacher's outputs of
every image view and caption are encoded (:mod:`distill.core.cache.encode`) and written shard by
shard (:mod:`distill.core.cache.writer`); shards are written to a temporary directory and renamed
when complete, so rerunning an interrupted run continues where it stopped and produces the same
bytes as an uninterrupted one. Under ``torchrun`` rank r writes shards r, r+W, ... and rank 0 the
manifest.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.core.cache.encode import Arrays, ShardOutputs, concat_padded, image_arrays, text_arrays
from distill.core.cache.schema import SHARDS, VIEW_PARAMS, read_manifest, stored_in_fp16
from distill.core.cache.writer import (ShardPlan, check_existing, clear_cache, plan_shards, read_shard_json,
                                       shard_is_complete, write_manifest, write_shard)
from distill.core.data.dataset import ImageTextDataset
from distill.core.data.factory import load_dataset
from distill.core.dist import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from distill.core.errors import BadSampleError
from distill.core.lock import writer_lock
from distill.core.registry import load_plugins
from distill.pipeline.cache.settings import CacheJob, CacheSettings
from distill.pipeline.cache.teacher import encode_captions, encode_views, probe_teacher, verify_cache
from distill.pipeline.cache.views import ViewImages, collate_views, jpeg_arrays, view_extra_arrays
from distill.pipeline.settings import check_out_folder
from teachers import Teacher, create_teacher

#: Estimated shard bytes above which the size report suggests a smaller ``--shard-size``.
SHARD_MEMORY_WARN = 2e9


@dataclass
class WriteStats:
    computed_shards: int = 0
    reused_shards: int = 0
    computed_images: int = 0


@dataclass(frozen=True)
class CacheResult:
    """What a cache run did: the folder, its size (images, captions, shards, stored bytes), the
    shards computed now and reused from an earlier run (all ranks), the samples skipped as bad,
    the size estimated before writing (rank 0), the wall time and the minimum cosines of
    ``--verify`` (empty when not verified; rank 0 only)."""

    out: Path
    num_images: int
    num_captions: int
    num_shards: int
    computed_shards: int
    reused_shards: int
    skipped_samples: int
    total_bytes: int
    seconds: float
    estimated_bytes: float | None = None
    verify: dict[str, float] = field(default_factory=dict)
    rank: int = 0

    def summary(self) -> str:
        """The one-line report of ``python -m distill.cache_teacher``."""
        return (f"cached {self.num_images} images, {self.num_captions} captions, {self.num_shards} shards "
                f"({self.computed_shards} computed, {self.reused_shards} reused, {self.skipped_samples} samples "
                f"skipped) in {self.seconds:.1f} s, {self.total_bytes / 1e6:.1f} MB -> {self.out}")


def estimate_cache_size(teacher: Teacher, ds: ImageTextDataset, settings: CacheSettings) -> dict[str, float]:
    """Bytes per array of the whole cache, extrapolated from the arrays of image 0 (all its views)
    and its captions (text token arrays are padded per batch, JPEG sizes vary: an estimate)."""
    item = ViewImages(ds, teacher.image_transform(), settings)[0]
    _, pixels, params, error, extra = collate_views([item])
    if error:
        raise BadSampleError(error)
    jpeg: list[list[np.ndarray]] = []
    with torch.inference_mode():
        image, _ = image_arrays(encode_views(teacher, pixels, settings.image_layers), pixels.shape[1], settings.tokens)
        image.update(view_extra_arrays(extra, settings, jpeg), **{VIEW_PARAMS: params.astype(np.float32)})
        if jpeg:
            image.update(jpeg_arrays(jpeg))
        caps = ds.captions[int(ds.offsets[0]):int(ds.offsets[1])]
        text = text_arrays(encode_captions(teacher, caps, settings.text_layers), settings.tokens)

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
        arrays, grid = image_arrays(encode_views(teacher, pixels, settings.image_layers, amp), pixels.shape[1],
                                    settings.tokens)
        arrays.update(view_extra_arrays(extra, settings, jpeg))
        params.append(view_params.astype(np.float32))
        outputs.add(arrays)
        progress.update(len(idx))
    a, b = plan.caption_range
    for start in range(a, b, batch_size):
        captions = encode_captions(teacher, ds.captions[start:min(start + batch_size, b)], settings.text_layers, amp)
        outputs.add(text_arrays(captions, settings.tokens))
        if caption_progress is not None:
            caption_progress.update(min(start + batch_size, b) - start)
    out = {k: concat_padded(v) for k, v in parts.items()}
    out[VIEW_PARAMS] = np.concatenate(params)
    if settings.pixels is not None and settings.pixels.format == "jpeg":
        out.update(jpeg_arrays(jpeg))
    return out, grid


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


def run_cache(settings: CacheSettings, job: CacheJob) -> CacheResult:
    """Cache the outputs of ``job.teacher`` for ``job.data`` into ``job.out`` with ``settings``.

    Checks before writing: the teacher can serve the settings (:func:`probe_teacher`), one writer
    per folder (:func:`writer_lock`, raises :class:`CacheLockedError`), no cache of another teacher,
    dataset or setting in the folder unless ``job.overwrite`` (:class:`CacheMismatchError`). Prints
    the size estimate and progress to stderr; shards already complete are reused. Raises the
    typed errors of :mod:`distill.core.errors`; returns what was done (every rank)."""
    t0 = time.time()
    load_plugins(job.plugins)
    out = check_out_folder(job.out)  # before any work: an existing file is no cache folder
    info = init_distributed(job.device)
    lock = contextlib.ExitStack()
    try:
        teacher = create_teacher(job.teacher, str(info.device))
        probe_teacher(teacher, settings)
        ds = load_dataset(job.data, job.split, job.images_root, on_bad_sample=job.on_bad_sample)
        if info.is_main:  # one writer per folder (the ranks of one torchrun job share it); taken before
            out.mkdir(parents=True, exist_ok=True)  # anything is written, after the inputs are checked
            lock.enter_context(writer_lock(out))
        if ds.skipped and info.is_main:
            print(f"skipped {len(ds.skipped)} bad sample(s):", *(f"  {s.reason}" for s in ds.skipped), sep="\n", file=sys.stderr)
        settings = settings.for_dataset(ds)
        source = {"teacher": teacher.config_hash(), "dataset": ds.fingerprint(), "settings": settings.key()}
        if job.overwrite:
            if info.is_main:
                clear_cache(out)
        else:
            check_existing(out, source)
        estimated = None
        if info.is_main and ds.num_images:
            sizes = estimate_cache_size(teacher, ds, settings)
            print_size_estimate(sizes, ds, settings)
            estimated = sum(sizes.values())
        barrier()
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        stats = write_shards(teacher, ds, out, settings, source, info, job.batch_size, job.num_workers, job.amp,
                             job.verify_existing, job.nonfinite, job.overflow)
        counts = all_reduce_mean(torch.tensor([stats.computed_shards, stats.reused_shards], dtype=torch.float64))
        computed, reused = (int(round(float(c) * info.world_size)) for c in counts)
        barrier()
        worst: dict[str, float] = {}
        if info.is_main:
            sections = {"teacher": {"spec": teacher.spec, "config_hash": source["teacher"], "config": teacher.config(),
                                    "logit_scale": float(teacher.logit_scale)},
                        "dataset": {"name": ds.name, "split": ds.split, "root": str(ds.root),
                                    "fingerprint": source["dataset"], "num_images": ds.num_images,
                                    "num_captions": ds.num_captions,
                                    "skipped": [{"where": s.where, "reason": s.reason} for s in ds.skipped]},
                        "storage": settings.storage_json(), "views": settings.views_json(),
                        "shard_size": settings.shard_size,
                        "compute": {"batch_size": job.batch_size, "amp": bool(job.amp), "device": info.device.type}}
            manifest = write_manifest(out, plan_shards(ds.offsets, settings.shard_size), ds.offsets, source, sections)
            report_output_checks(manifest)
            if job.verify:
                worst = verify_cache(out, teacher, ds, job.verify)
        barrier()
        if not info.is_main:
            manifest = read_manifest(out)
        size = sum(e["bytes"] for s in manifest["shards"] for e in s["arrays"].values())
        return CacheResult(out, ds.num_images, ds.num_captions, len(manifest["shards"]), computed, reused,
                           len(ds.skipped), size, time.time() - t0, estimated, worst, info.rank)
    finally:
        lock.close()
        cleanup()
