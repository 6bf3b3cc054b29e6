"""Screen a training batch's teacher targets for NaN/Inf before they reach the losses.

``data.on_nonfinite: error`` (default) stops training with :class:`NonFiniteTargetError` naming the
cache, the shard and the image/view/caption ids of the damaged rows; ``skip`` drops those rows from
the batch (counted). Under ``torchrun`` the ranks agree: all raise together, and in skip mode every
rank keeps the same number of rows (the smallest count of finite rows over the ranks), so gathered
features stay rectangular.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distill.core.cache.reader import TeacherCache
from distill.core.cache.schema import is_image_array, target_arrays
from distill.core.dist import is_dist
from distill.core.errors import NonFiniteTargetError
from distill.core.features import TeacherTargets
from distill.pipeline.train.data import TrainBatch

MODES = ("error", "skip")


def _bad(x: Tensor | None, n: int) -> Tensor | None:
    if x is None or not x.is_floating_point():
        return None
    return ~torch.isfinite(x.reshape(n, -1)).all(dim=1) if x.numel() else None


def nonfinite_fields(t: TeacherTargets, n: int) -> dict[str, Tensor]:
    """``{cache array name: [n] bool (row holds NaN/Inf)}`` for every floating teacher target."""
    return {name: m for name, x in target_arrays(t).items() if (m := _bad(x, n)) is not None}


def _shard(cache: TeacherCache, index: int, key: str) -> str:
    for s in cache.manifest["shards"]:
        lo, hi = s[key]
        if lo <= index < hi:
            return str(s["dir"])
    return "?"


def describe(cache: TeacherCache, batch: TrainBatch, fields: dict[str, Tensor], limit: int = 5) -> str:
    """``image 17 view 0 (shards/00001: image_embed), caption 35 (...)`` for the first bad rows."""
    bad = torch.stack(list(fields.values())).any(dim=0)
    rows = torch.nonzero(bad).flatten().tolist()
    parts = []
    for r in rows[:limit]:
        names = [name for name, m in fields.items() if bool(m[r])]
        img = [n for n in names if is_image_array(n)]
        txt = [n for n in names if n not in img]
        if img:
            i = int(batch.image_index[r])
            parts.append(f"image {i} view {int(batch.view[r])} ({_shard(cache, i, 'image_range')}: {', '.join(img)})")
        if txt:
            c = int(batch.caption_index[r])
            parts.append(f"caption {c} ({_shard(cache, c, 'caption_range')}: {', '.join(txt)})")
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return "; ".join(parts) + more


def _all_reduce(values: list[int], op: Any, device: torch.device) -> list[int]:
    if not is_dist():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def screen_batch(batch: TrainBatch, cache: TeacherCache, mode: str) -> tuple[TrainBatch, int]:
    """(the batch with non-finite rows dropped, number of non-finite rows over all ranks); raises
    :class:`NonFiniteTargetError` in ``error`` mode. A kept batch may be empty (all rows dropped)."""
    n = int(batch.image_index.shape[0])
    fields = nonfinite_fields(batch.teacher, n)
    bad = torch.stack(list(fields.values())).any(dim=0) if fields else torch.zeros(n, dtype=torch.bool)
    device = bad.device
    local_bad = int(bad.sum())
    distributed = is_dist()
    if not distributed and local_bad == 0:
        return batch, 0
    (total_bad,) = _all_reduce([local_bad], torch.distributed.ReduceOp.SUM if distributed else None, device)
    if total_bad == 0:
        return batch, 0
    if mode != "skip":
        where = describe(cache, batch, fields) if local_bad else "on another rank"
        raise NonFiniteTargetError(f"teacher cache {cache.path}: non-finite (NaN/Inf) teacher targets in "
                                   f"{total_bad} sample(s) of a training batch: {where}. Rebuild the cache or set "
                                   "data.on_nonfinite=skip to drop such samples")
    keep = torch.nonzero(~bad).flatten()
    (kept,) = _all_reduce([int(keep.numel())], torch.distributed.ReduceOp.MIN if distributed else None, device)
    return keep_rows(batch, keep[:kept]), total_bad


def keep_rows(batch: TrainBatch, keep: Tensor) -> TrainBatch:
    """``batch`` restricted to rows ``keep`` (JPEG pixels: their byte ranges of the concatenation)."""
    out = batch.apply(lambda x: x[keep.to(x.device)])
    out.texts = [batch.texts[int(i)] for i in keep.tolist()]
    if batch.pixel_format == "jpeg":
        parts = torch.split(batch.pixels, [int(n) for n in batch.pixel_lengths.cpu()])
        rows = keep.cpu().tolist()
        out.pixels = torch.cat([parts[i] for i in rows]) if rows else batch.pixels[:0]
    return out
