"""Malformed manifest fields raise ManifestError naming the field (never IndexError/TypeError/KeyError)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from distill.core.cache.reader import TeacherCache
from distill.core.errors import ManifestError
from distill.pipeline.cache.main import main
from tests.helpers.caches import BASE
from tests.helpers.data import make_tiny_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("schema")
    tsv = make_tiny_dataset(root / "data")
    assert main([*BASE, "--data", str(tsv), "--out", str(root / "cache")]) == 0
    return root / "cache"


def _set(m: dict, dotted: str, value) -> None:
    node = m
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[parts[-1]]
    elif isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


_DELETE = object()


def _reversed(m):
    m["shards"] = m["shards"][::-1]


def _overlap(m):
    m["shards"][1]["image_range"][0] -= 1


CASES = [
    ("shards", [], r"field shards must be a non-empty list"),
    ("shards.1", "shards/00001", r"field shards\[1\] must be an object"),
    ("shards.0.arrays", _DELETE, r"missing field shards\[0\]\.arrays"),
    ("shards.2.arrays", [], r"field shards\[2\]\.arrays must be an object"),
    ("dims", None, r"field dims must be an object"),
    ("dims.embed", "16", r"field dims\.embed must be an integer"),
    ("views.count", 0, r"field views\.count must be an integer >= 1"),
    ("views", {"count": "2"}, r"field views\.count must be an integer"),
    ("teacher.logit_scale", "abc", r"field teacher\.logit_scale must be a finite number"),
    ("teacher.logit_scale", float("nan"), r"field teacher\.logit_scale must be a finite number"),
    ("dataset.num_images", "12", r"field dataset\.num_images must be an integer"),
    ("dataset.num_captions", True, r"field dataset\.num_captions must be an integer"),
    ("shard_size", 0, r"field shard_size must be an integer >= 1"),
    ("storage.dtype", "fp8", r"field storage\.dtype must be fp16 or int8"),
    ("shards.0.dir", "../../etc", r"field shards\[0\]\.dir must be a folder inside the cache"),
    ("shards.0.dir", "/tmp", r"field shards\[0\]\.dir must be a folder inside the cache"),
    ("shards.0.dir", ".", r"field shards\[0\]\.dir must be a folder inside the cache"),
    ("shards.0.dir", 5, r"field shards\[0\]\.dir must be a non-empty string"),
    ("shards.0.image_range", [0], r"field shards\[0\]\.image_range must be a list of 2 integers"),
    ("shards.0.caption_range", None, r"field shards\[0\]\.caption_range must be a list of 2 integers"),
    ("shards.0.arrays.image_embed.shape", "5,1,16", r"field shards\[0\]\.arrays\.image_embed\.shape must be a list"),
    ("shards.0.arrays.image_embed.shape", [4, 1, 16], r"shards\[0\]\.arrays\.image_embed\.shape \[4, 1, 16\] does not start"),
    ("shards.0.arrays.image_embed.sha256", "xyz", r"field shards\[0\]\.arrays\.image_embed\.sha256 must be 64"),
    ("shards.0.arrays.image_embed.bytes", -1, r"field shards\[0\]\.arrays\.image_embed\.bytes must be an integer >= 0"),
    ("shards.0.arrays.text_mask", _DELETE, r"missing field shards\[0\]\.arrays\.text_mask"),
    ("offsets", {"shape": [13]}, r"missing field offsets\.dtype"),
    ("teacher", "toy:0", r"field teacher must be an object"),
    ("format_version", 2, r"format_version 2 is not supported"),
    ("shards.1.image_stats", 7, r"field shards\[1\]\.image_stats must be a non-empty string"),
    ("dataset.num_images", 13, r"field shards covers 12 images / 24 captions, but dataset says 13 / 24"),
    ("views.count", 2, r"field views\.count is 2, but shards\[0\]\.arrays\.image_embed\.shape \[5, 1, 16\] holds 1 "),
    ("dims.embed", 32, r"field dims\.embed is 32, but shards\[0\]\.arrays\.image_embed\.shape \[5, 1, 16\] holds "
                       r"embeddings of width 16"),
    ("dims.image_tokens", [4, 24], r"field dims\.image_tokens is \[4, 24\], but shards\[0\]\.arrays\.image_tokens"),
    ("dims.text_tokens", [2, 20], r"field dims\.text_tokens is \[2, 20\], but shards\[0\]\.arrays\.text_tokens"),
    (_reversed, None, r"field shards\[0\]\.image_range is \[10, 12\]; shards must cover the rows in order"),
    (_overlap, None, r"field shards\[1\]\.image_range is \[4, 10\]; shards must cover the rows in order"),
]


@pytest.mark.parametrize("field, value, message", CASES, ids=[c[0] if isinstance(c[0], str) else c[0].__name__ for c in CASES])
def test_malformed_field_is_named(built, tmp_path, field, value, message):
    out = tmp_path / "c"
    shutil.copytree(built, out)
    m = json.loads((out / "manifest.json").read_text())
    if callable(field):
        field(m)
    else:
        _set(m, field, value)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        TeacherCache(out)


def test_bad_array_name_cannot_reach_outside(built, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(built, out)
    m = json.loads((out / "manifest.json").read_text())
    arrays = m["shards"][0]["arrays"]
    arrays["../../../secret"] = copy.deepcopy(arrays["image_embed"])
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"field shards\[0\]\.arrays key must be an array name"):
        TeacherCache(out)


def test_intact_manifest_still_opens(built):
    cache = TeacherCache(built)
    assert cache.num_images == 12 and len(cache.manifest["shards"]) == 3
