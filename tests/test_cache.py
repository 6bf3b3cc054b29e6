"""Teacher cache: writer CLI + TeacherCache reader round trips and storage modes (toy teacher)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.core.data.augment import IDENTITY
from distill.core.cache.reader import bytes_per_sample
from distill.pipeline.cache.settings import CacheSettings
from distill.pipeline.cache.views import image_view_params
from distill.core.data.factory import load_dataset
from tests.helpers.caches import BASE, build, teacher_images, teacher_texts, tree_bytes
from tests.helpers.paths import REPO
from tests.helpers.procs import free_port


def feature_tensors(f) -> dict[str, torch.Tensor]:
    """Every tensor of image/text features by field (intermediates by layer name)."""
    return {**{k: v for k, v in vars(f).items() if isinstance(v, torch.Tensor)}, **f.intermediates}


def test_round_trip_full_fp16(tiny_tsv, tmp_path, toy_teacher):
    cache = build(tiny_tsv, tmp_path / "c", "--layers", "image.1,text.2")
    ds = load_dataset(tiny_tsv)
    assert (cache.num_images, cache.num_captions, cache.num_views) == (12, 24, 1)
    assert cache.logit_scale == 50.0 and cache.image_grid == (4, 4)
    np.testing.assert_array_equal(cache.offsets, ds.offsets)
    cache.check(toy_teacher.config_hash(), ds.fingerprint())

    ids = np.array([11, 0, 5, 4, 7])  # spans all three shards, unsorted
    got = cache.images(ids)
    ref = teacher_images(toy_teacher, ds, ids)
    assert got.embed.dtype == torch.float32 and got.embed.shape == (5, 16)
    torch.testing.assert_close(got.embed, ref.embed, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.tokens, ref.tokens, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.intermediates["image.1"], ref.intermediates["image.1"], atol=2e-3, rtol=2e-3)

    caps = np.array([23, 0, 9, 10])
    t = cache.texts(caps)
    tref = teacher_texts(toy_teacher, [ds.captions[c] for c in caps])
    torch.testing.assert_close(t.embed, tref.embed, atol=2e-3, rtol=2e-3)
    assert t.mask.dtype == torch.bool and torch.equal(t.mask, tref.mask)
    torch.testing.assert_close(t.tokens, tref.tokens, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(t.intermediates["text.2"], tref.intermediates["text.2"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cache.view_params([3, 4]), torch.tensor(np.stack([IDENTITY] * 2)))

    bps = bytes_per_sample(cache)
    assert bps["image_embed"] == 16 * 2 and bps["image_tokens"] == 16 * 24 * 2 and bps["text_embed"] == 16 * 2
    assert bps["text_mask"] == 16 and bps["per_image_with_captions"] == bps["image_total"] + 2 * bps["text_total"]
    d = cache.describe()
    assert d["num_shards"] == 3 and d["dims"]["image_tokens"] == [16, 24] and d["dims"]["text_tokens"] == [16, 20]
    assert d["total_bytes"] > 12 * bps["image_total"]


def test_multi_caption_offsets(tmp_path, toy_teacher):
    from tests.helpers.data import make_tiny_dataset

    tsv = make_tiny_dataset(tmp_path / "d", n_images=7, caps_per_image=1)
    rows = tsv.read_text().splitlines()
    extra = [f"images/img001.jpg\tsecond caption of one {k}" for k in range(3)] + ["images/img005.jpg\tanother for five"]
    tsv.write_text("\n".join(rows + extra) + "\n")  # captions are grouped by image on load
    cache = build(tsv, tmp_path / "c")
    ds = load_dataset(tsv)
    assert cache.num_captions == 11
    np.testing.assert_array_equal(cache.offsets, [0, 1, 5, 6, 7, 8, 10, 11])
    np.testing.assert_array_equal(cache.caption_image, np.repeat(np.arange(7), [1, 4, 1, 1, 1, 2, 1]))
    caps = np.arange(cache.offsets[5], cache.offsets[6])  # image 5 is in the second shard
    ref = teacher_texts(toy_teacher, ds.captions_of(5))
    torch.testing.assert_close(cache.texts(caps).embed, ref.embed, atol=2e-3, rtol=2e-3)
    assert ds.captions_of(5)[1] == "another for five"


def test_grid_pooling(tiny_tsv, tmp_path, toy_teacher):
    cache = build(tiny_tsv, tmp_path / "c", "--image-tokens", "grid:2", "--text-tokens", "none")
    ds = load_dataset(tiny_tsv)
    ref = teacher_images(toy_teacher, ds, [2, 9]).tokens  # [2, 16, 24] on a 4x4 grid
    pooled = ref.reshape(2, 2, 2, 2, 2, 24).mean(dim=(2, 4)).reshape(2, 4, 24)  # 2x2 blocks of the 4x4 grid
    got = cache.images([2, 9])
    torch.testing.assert_close(got.tokens, pooled, atol=2e-3, rtol=2e-3)
    assert cache.image_grid == (2, 2) and cache.texts([0]).tokens is None


def test_topk_storage(tiny_tsv, tmp_path, toy_teacher):
    cache = build(tiny_tsv, tmp_path / "c", "--image-tokens", "topk:5", "--text-tokens", "topk:20")
    ds = load_dataset(tiny_tsv)
    ref = teacher_images(toy_teacher, ds, [1, 6]).tokens
    got = cache.images([1, 6])
    idx = got.token_index
    assert idx.dtype == torch.int64 and idx.shape == (2, 5)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # kept in original order
    expected = torch.sort(torch.topk(ref.norm(dim=-1), 5, dim=1).indices, dim=1).values
    assert torch.equal(idx, expected)
    torch.testing.assert_close(got.tokens, torch.gather(ref, 1, idx[..., None].expand(-1, -1, 24)), atol=2e-3, rtol=2e-3)
    assert cache.image_grid is None

    # text: 20 > context 16, so all 16 real-or-padding positions are kept, padding ranked last
    tref = teacher_texts(toy_teacher, [ds.captions[3]])
    t = cache.texts([3])
    n_real = int(tref.mask.sum())
    assert t.tokens.shape == (1, 20, 20) and int(t.mask.sum()) == n_real
    assert torch.equal(t.token_index[0, :n_real], torch.arange(n_real))
    torch.testing.assert_close(t.tokens[0, :n_real], tref.tokens[0, :n_real], atol=2e-3, rtol=2e-3)


def test_int8_storage(tiny_tsv, tmp_path, toy_teacher):
    cache = build(tiny_tsv, tmp_path / "c", "--dtype", "int8")
    ds = load_dataset(tiny_tsv)
    shard = tmp_path / "c" / "shards" / "00000"
    assert np.load(shard / "image_tokens.npy").dtype == np.int8
    assert np.load(shard / "image_tokens_scale.npy").dtype == np.float32
    assert np.load(shard / "text_tokens.npy").dtype == np.int8
    ref = teacher_images(toy_teacher, ds, [0, 7]).tokens
    got = cache.images([0, 7]).tokens
    step = ref.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((got - ref).abs() <= step / 2 + 1e-6)
    assert got.abs().amax(dim=-1).sub(ref.abs().amax(dim=-1)).abs().max() < 1e-5  # absmax is exact


def test_views_reproducible(tiny_tsv, tmp_path, toy_teacher):
    cache = build(tiny_tsv, tmp_path / "c", "--views", "3", "--view-seed", "7", "--image-tokens", "none")
    ds = load_dataset(tiny_tsv)
    ids = [0, 8, 11]
    np.testing.assert_array_equal(cache.view_params(ids, 0).numpy(), np.stack([IDENTITY] * 3))
    params = cache.view_params(ids, 2).numpy()
    assert not np.allclose(params, IDENTITY)
    settings = CacheSettings(views=3, view_seed=7)
    np.testing.assert_array_equal(params, np.stack([image_view_params(i, settings)[2] for i in ids]))
    ref = teacher_images(toy_teacher, ds, ids, params)
    torch.testing.assert_close(cache.images(ids, view=2).embed, ref.embed, atol=2e-3, rtol=2e-3)
    per_sample = cache.images(ids, view=[0, 2, 1]).embed  # one view per sample
    torch.testing.assert_close(per_sample[1], cache.images([8], 2).embed[0])
    # view parameters do not depend on the shard layout
    other = build(tiny_tsv, tmp_path / "c2", "--views", "3", "--view-seed", "7", "--image-tokens", "none", "--shard-size", "4")
    torch.testing.assert_close(other.view_params(ids, 1), cache.view_params(ids, 1))


def test_rerun_reuses_shards_and_removes_stale_tmp(tiny_tsv, tmp_path, capsys):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    before = tree_bytes(out)
    (out / "shards" / "00001.tmp-0").mkdir()
    (out / "shards" / "00001.tmp-0" / "junk.npy").write_bytes(b"x")
    capsys.readouterr()
    build(tiny_tsv, out, "--verify", "3", "--num-workers", "2")
    assert "(0 computed, 3 reused" in capsys.readouterr().out
    assert tree_bytes(out) == before


@pytest.mark.slow
def test_torchrun_two_processes_match_single(tiny_tsv, tmp_path):
    single = tmp_path / "single"
    build(tiny_tsv, single, "--views", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "distill.cache_teacher", *BASE, "--data", str(tiny_tsv), "--out", str(tmp_path / "multi"),
           "--views", "2", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 shards (3 computed, 0 reused" in res.stdout
    assert tree_bytes(tmp_path / "multi") == tree_bytes(single)


def test_row_copy_and_batched_gathers_agree(tiny_tsv, tmp_path, monkeypatch):
    """Token rows above ``ROW_COPY_BYTES`` are copied row by row; the result (order across shards,
    views per sample, int8 dequantisation, text padding, fp16 pass-through) equals the per-shard
    batched gather."""
    import distill.core.cache.reader as cache_mod

    ids, caps, views = [11, 0, 6, 3, 7, 0], [20, 1, 9, 14, 2], [1, 0, 1, 1, 0, 1]
    for extra in ([], ["--dtype", "int8"]):
        cache = build(tiny_tsv, tmp_path / f"c{len(extra)}", "--views", "2", *extra)
        assert len(cache.manifest["shards"]) > 1
        got = {}
        for row_bytes in (1 << 30, 0):  # never / always row by row
            monkeypatch.setattr(cache_mod, "ROW_COPY_BYTES", row_bytes)
            got[row_bytes] = [cache.images(ids, view=views), cache.texts(caps), cache.images(ids, view=views, keep_fp16=True),
                              cache.texts(caps, keep_fp16=True)]
        for batched, rowwise in zip(*(map(feature_tensors, v) for v in got.values())):
            assert batched.keys() == rowwise.keys()
            for k in batched:
                assert batched[k].dtype == rowwise[k].dtype and torch.equal(batched[k], rowwise[k]), k
        first = got[0][0].tokens[1]  # image 0, view 0 read alone
        assert torch.equal(first, cache.images([0], view=0).tokens[0])
