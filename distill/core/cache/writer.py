"""Writing a teacher cache folder: the shard plan, atomic array/JSON writes with their sha256
records, one shard (written to a temporary folder and renamed into place when complete), the
checks that let an interrupted run resume (complete shards are reused, shards of another teacher,
dataset or setting refuse to mix), and ``manifest.json`` collected from every shard's
``shard.json``. One writer per folder: :func:`distill.core.lock.writer_lock`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.cache.encode import Arrays, parse_token_mode
from distill.core.cache.schema import (FORMAT_VERSION, IMAGE, MANIFEST, MANIFEST_CHECKSUM, OFFSETS, SHARD_JSON, SHARDS,
                                       TEXT, VIEW_TOKENS, field_array, manifest_checksum, read_manifest)
from distill.core.cache.verify import check_file
from distill.core.errors import CacheError, CacheMismatchError, CacheWriteError


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index``: images ``image_range`` and their captions ``caption_range`` (end exclusive),
    written to the folder :attr:`dir` of the cache."""

    index: int
    image_range: tuple[int, int]
    caption_range: tuple[int, int]

    @property
    def dir(self) -> str:
        return f"{SHARDS}/{self.index:05d}"

    @property
    def num_images(self) -> int:
        return self.image_range[1] - self.image_range[0]


def plan_shards(offsets: np.ndarray, shard_size: int) -> list[ShardPlan]:
    """Split images into shards of ``shard_size`` (the last one shorter) with their captions."""
    n = len(offsets) - 1
    return [ShardPlan(i, (a, min(a + shard_size, n)), (int(offsets[a]), int(offsets[min(a + shard_size, n)])))
            for i, a in enumerate(range(0, n, shard_size))]


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
            found.append((out / MANIFEST, read_manifest(out, checksum=False)["source"]))
        except (CacheError, KeyError):
            print(f"warning: ignoring unreadable {out / MANIFEST}; it will be rewritten", file=sys.stderr)
    shards = out / SHARDS
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
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    for name in (MANIFEST, OFFSETS, MANIFEST + ".tmp", OFFSETS + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for tmp in [*out.glob(MANIFEST + ".tmp-*"), *out.glob(OFFSETS + ".tmp-*")]:
        tmp.unlink(missing_ok=True)


def manifest_dims(shards: list[dict[str, Any]], storage: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``dims``: embedding width, image token grid and row shapes of the token
    arrays (text tokens: the longest caption of any shard), view-token and pixel shapes."""
    first = shards[0]["arrays"]
    image_tokens, text_tokens = field_array(IMAGE, "tokens"), field_array(TEXT, "tokens")
    dims = {"embed": first[field_array(IMAGE, "embed")]["shape"][-1], "image_grid": shards[0]["image_grid"],
            "image_tokens": first[image_tokens]["shape"][2:] if image_tokens in first else None,
            "text_tokens": [max(s["arrays"][text_tokens]["shape"][1] for s in shards), first[text_tokens]["shape"][2]]
            if text_tokens in first else None}
    if VIEW_TOKENS in first:
        g = parse_token_mode(storage["view_tokens"]).k
        dims.update(view_tokens=first[VIEW_TOKENS]["shape"][2:], view_token_grid=[g, g])
    if storage.get("pixels") is not None:
        size = int(storage["pixels"]["size"])
        dims["pixels"] = [size, size, 3]
    return dims


def write_manifest(out: Path, plans: list[ShardPlan], offsets: np.ndarray, source: dict[str, str],
                   sections: dict[str, Any]) -> dict[str, Any]:
    """Collect the shard.json of every shard of ``plans`` (all ranks) into manifest.json and write
    offsets.npy. ``sections``: the ``teacher``, ``dataset``, ``storage``, ``views`` and
    ``shard_size`` fields (plus any extra ones, e.g. ``compute``)."""
    shards = []
    for plan in plans:
        info = read_shard_json(out / plan.dir)
        if info is None or info.get("source") != source:
            raise CacheWriteError(f"shard {out / plan.dir} is missing or incomplete after all ranks finished")
        shards.append({k: v for k, v in info.items() if k != "source"})
    try:
        tmp = out / f"{OFFSETS}.tmp-{os.getpid()}"
        offsets_record = save_array(tmp, offsets)
        os.replace(tmp, out / OFFSETS)
        manifest = {"format_version": FORMAT_VERSION, "source": source, **sections, "offsets": offsets_record,
                    "shards": shards, "dims": manifest_dims(shards, sections["storage"])}
        manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
        write_json_atomic(out / MANIFEST, manifest)
        fsync_dir(out)
    except OSError as e:
        raise CacheWriteError(f"writing {out / MANIFEST} failed: {e}; rerun the same command to finish") from e
    return manifest
