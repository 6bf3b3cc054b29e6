"""Toy-teacher caches and what they should hold.

``build`` writes a cache with small batches and shards (``BASE``: batch 3, 5 images per shard, so
the 12-image tiny dataset spans 3 shards); ``build_cache`` writes the one-shard cache the training
tests use; ``edit_manifest`` changes a manifest as a rebuild would (its checksum recomputed). ``teacher_images``/``teacher_texts`` are the toy teacher's own outputs to compare a cache
against; ``tree_bytes`` snapshots a folder to compare two runs byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from distill.core.cache.reader import TeacherCache
from distill.core.data.augment import apply_view
from distill.pipeline.cache.main import main as cache_main

BASE = ["--plugin", "tests.helpers.toy_teachers", "--teacher", "toy:0", "--num-workers", "0", "--batch-size", "3",
        "--shard-size", "5"]


def build(data: Path, out: Path, *extra: str) -> TeacherCache:
    """Cache ``data`` with the ``BASE`` settings (plus ``extra``) in-process; returns its reader."""
    assert cache_main([*BASE, "--data", str(data), "--out", str(out), *extra]) == 0
    return TeacherCache(out)


def build_cache(tsv: Path, out: Path, views: int = 1) -> Path:
    """Toy-teacher cache of ``tsv`` written in-process (batch 8, ``views`` views per image)."""
    cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tsv), "--out", str(out),
                "--num-workers", "0", "--batch-size", "8", "--views", str(views), "--device", "cpu"])
    return out


def edit_manifest(cache: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to ``cache``'s manifest and rewrite it with a matching ``manifest_sha256``
    (as if the cache had been rebuilt so; a plain edit is refused by the checksum)."""
    from distill.core.cache.schema import MANIFEST_CHECKSUM, manifest_checksum

    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    m[MANIFEST_CHECKSUM] = manifest_checksum(m)
    path.write_text(json.dumps(m))


def teacher_images(teacher, ds, ids, params=None):
    """``teacher``'s image features (intermediate layer 1) of images ``ids`` of ``ds``, each under its view
    ``params`` when given."""
    tf = teacher.image_transform()
    imgs = [ds.load_image(i) for i in ids]
    if params is not None:
        imgs = [apply_view(im, p) for im, p in zip(imgs, params)]
    with torch.no_grad():
        return teacher.encode_image(torch.stack([tf(im) for im in imgs]), layers=[1])


def teacher_texts(teacher, captions):
    """``teacher``'s text features (intermediate layer 2) of ``captions``."""
    with torch.no_grad():
        return teacher.encode_text(teacher.tokenize(captions), layers=[2])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
