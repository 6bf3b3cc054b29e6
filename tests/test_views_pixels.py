"""Many views, mixup views (function matching) and the student-pixel cache (raw uint8 and JPEG)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.pipeline.cache.run as cache_run
import distill.pipeline.train.main as ts
from distill.core.cache.encode import parse_token_mode
from distill.core.cache.reader import TeacherCache
from distill.core.cache.verify import verify_pixels
from distill.core.errors import CacheCorruptError, CacheError, PixelCacheError
from distill.core.data.factory import load_dataset
from distill.core.dist import init_distributed
from distill.core.data.mixup import NO_MIX, mix_images, view_image
from distill.core.data.pixels import crop_pixels, normalise_pixels, student_pixels
from distill.pipeline.cache.main import main as cache_main
from distill.pipeline.cache.settings import CacheSettings, resolve_view_tokens
from distill.pipeline.cache.views import image_mix_params, image_view_params
from distill.pipeline.train.data import DistillTrainSet, TeacherCollate
from distill.pipeline.train.log import read_log
from teachers import create_teacher
from tests.helpers.data import make_tiny_dataset
from tests.helpers.training import train_args

VIEWS, MIXUP = 3, 2


def write(tsv: Path, out: Path, *extra: str) -> Path:
    cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tsv), "--out", str(out),
                "--num-workers", "0", "--batch-size", "4", "--shard-size", "5", "--device", "cpu", *extra])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("views")
    tsv = make_tiny_dataset(root / "data")
    common = ("--views", str(VIEWS), "--mixup-views", str(MIXUP))
    return {"tsv": tsv,
            "raw": write(tsv, root / "raw", *common, "--pixels", "32", "--verify", "4"),
            "jpeg": write(tsv, root / "jpeg", *common, "--pixels", "24", "--pixel-format", "jpeg", "--verify", "4")}


def shard_records(cache: Path) -> dict[str, dict]:
    m = json.loads((cache / "manifest.json").read_text())
    return {f"{s['dir']}/{n}": e for s in m["shards"] for n, e in s["arrays"].items()}


def test_manifest_records_views_mixup_and_pixels(data):
    cache = TeacherCache(data["raw"], verify="full")
    m = cache.manifest
    assert m["views"] == {"count": 5, "seed": 0, "scale": [0.5, 1.0], "plain": 3, "mixup": 2, "mixup_alpha": 1.0}
    assert m["storage"]["pixels"] == {"size": 32, "format": "raw"} and m["storage"]["view_tokens"] == "grid:2"
    assert m["dims"]["pixels"] == [32, 32, 3] and m["dims"]["view_token_grid"] == [2, 2]
    recs = shard_records(data["raw"])
    px = recs["shards/00000/image_pixels"]
    assert px["shape"] == [5, 5, 32, 32, 3] and px["dtype"] == "uint8" and len(px["sha256"]) == 64
    # tokens: view 0 kept full (4x4 toy grid), every view pooled to 2x2
    assert recs["shards/00000/image_tokens"]["shape"] == [5, 1, 16, 24]
    assert recs["shards/00000/image_view_tokens"]["shape"] == [5, 5, 4, 24]
    assert recs["shards/00000/view_params_partner"]["shape"] == [5, 5]
    assert TeacherCache(data["jpeg"]).manifest["storage"]["pixels"] == {"size": 24, "format": "jpeg", "quality": 90}


def test_mixup_params_deterministic_and_folded(data):
    cache = TeacherCache(data["raw"])
    ids = np.arange(cache.num_images)
    for v in range(5):
        partner, mix = cache.view_mix(ids, v)
        if v < VIEWS:
            assert (partner == -1).all() and np.array_equal(mix, np.tile(NO_MIX, (len(ids), 1)))
        else:
            assert (partner != ids).all() and (partner >= 0).all() and (partner < cache.num_images).all()
            assert (mix[:, 0] >= 0.5).all() and (mix[:, 0] <= 1).all() and (mix[:, 3:5] <= 1).all()
    settings = CacheSettings(views=VIEWS, mixup_views=MIXUP)
    p1, m1 = image_mix_params(7, settings, 12)
    p2, m2 = image_mix_params(7, settings, 12)
    assert np.array_equal(p1, p2) and np.array_equal(m1, m2)
    assert np.array_equal(p1, cache.view_mix([7] * 5, np.arange(5))[0])
    # the plain views do not move when mixup views are added
    assert np.array_equal(image_view_params(7, settings)[:VIEWS],
                          image_view_params(7, CacheSettings(views=VIEWS))), "plain views changed"


def test_default_settings_keep_the_old_cache_key():
    """Caches written before views/mixup/pixels existed resume: the default settings hash the same blob."""
    import hashlib

    old = {"storage": {"image_tokens": "full", "text_tokens": "full", "dtype": "fp16", "intermediate_layers": []},
           "views": {"count": 1, "seed": 0, "scale": [0.5, 1.0]}, "shard_size": 1024}
    assert CacheSettings().key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert CacheSettings(views=2, view_tokens="grid:2").key() != CacheSettings(views=2).key()


def test_mix_images_is_the_weighted_blend():
    from PIL import Image

    a = Image.fromarray(np.full((6, 8, 3), 200, np.uint8))
    b = Image.fromarray(np.full((3, 4, 3), 40, np.uint8))
    out = np.asarray(mix_images(a, b, 0.75)).astype(int)
    assert out.shape == (6, 8, 3) and np.abs(out - (0.75 * 200 + 0.25 * 40)).max() <= 1


def test_student_sees_exactly_what_the_teacher_saw(data):
    """Function matching: the student's view (rebuilt from the stored parameters, or read from the
    pixel cache) is the image whose teacher outputs are cached."""
    tsv, cache = data["tsv"], TeacherCache(data["raw"])
    ds = load_dataset(str(tsv))
    teacher = create_teacher("toy:0", "cpu")
    decode = DistillTrainSet(ds, cache, lambda im: torch.from_numpy(crop_pixels(im, 32)), seed=0)
    for i in (0, 5, 11):
        for v in range(VIEWS, VIEWS + MIXUP):  # mixup views
            img = decode.view_image(i, v)
            with torch.no_grad():
                fresh = teacher.encode_image(teacher.image_transform()(img)[None]).embed
            cached = cache.images([i], v).embed
            assert torch.nn.functional.cosine_similarity(fresh, cached).item() > 0.999
            # pixel cache == rebuilt crop, byte for byte
            assert torch.equal(cache.pixels([i], v)[0], torch.from_numpy(crop_pixels(img, 32)))
            plain = view_image(ds.load_image, i, cache.view_params([i], v)[0].numpy())
            assert not np.array_equal(np.asarray(plain), np.asarray(img)), "mixup view is not mixed"


class _Student:
    image_size, mean, std = 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_pixel_path_equals_decode_path_to_uint8_rounding(data):
    from torchvision import transforms as T

    tsv, cache = data["tsv"], TeacherCache(data["raw"])
    ds = load_dataset(str(tsv))
    s = _Student()
    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(s.mean, s.std)])
    keys = [(i, e) for i in range(8) for e in (0, 1)]
    decoded = DistillTrainSet(ds, cache, transform, seed=3, pixels="decode")
    stored = DistillTrainSet(ds, cache, transform, seed=3, pixels="auto")
    assert decoded.pixel_source == "decode" and stored.pixel_source == "raw"
    collate = TeacherCollate(cache)
    a, b = collate([decoded[k] for k in keys]), collate([stored[k] for k in keys])
    assert a.pixel_format == "float" and b.pixel_format == "raw" and b.pixels.dtype == torch.uint8
    assert set(b.view.tolist()) - {0} and torch.equal(a.view, b.view)
    x, y = student_pixels(a, s, torch.device("cpu")), student_pixels(b, s, torch.device("cpu"))
    assert x.shape == y.shape == (16, 3, 32, 32)
    assert (x - y).abs().max() <= 1e-5, "same crop bytes must give the same student input"
    assert b.teacher.image.grid == (2, 2) and b.teacher.image.tokens.shape[1:] == (4, 24)


def test_device_resize_when_student_size_differs():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    y = normalise_pixels(x, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ref = torch.nn.functional.interpolate(x.float() / 255, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    assert y.shape == (2, 3, 16, 16) and torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(normalise_pixels(x, 32, (0.5,) * 3, (0.5,) * 3), (x.float() / 255 - 0.5) / 0.5)


def test_jpeg_pixels_decode_in_batches_on_cpu(data):
    tsv, cache = data["tsv"], TeacherCache(data["jpeg"])
    ds = load_dataset(str(tsv))
    trainset = DistillTrainSet(ds, cache, lambda im: None, seed=0, pixels="cache")
    assert trainset.pixel_source == "jpeg"
    batch = TeacherCollate(cache)([trainset[(i, 0)] for i in range(6)])
    assert batch.pixel_format == "jpeg" and batch.pixel_lengths.shape == (6,)
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.numel() == int(batch.pixel_lengths.sum())
    moved = batch.to(torch.device("cpu"))
    x = student_pixels(moved, _Student(), torch.device("cpu"))
    assert x.shape == (6, 3, 32, 32) and torch.isfinite(x).all()  # 24 px stored, resized to 32 on the device
    from distill.core.data.pixels import decode_jpeg_batch, encode_jpeg

    got = decode_jpeg_batch(batch.pixels, batch.pixel_lengths, torch.device("cpu"))
    for row, (i, v) in enumerate(zip(batch.image_index.tolist(), batch.view.tolist())):
        ref = torch.from_numpy(encode_jpeg(crop_pixels(trainset.view_image(i, v), 24), 90).copy())
        assert torch.equal(batch.pixels[int(batch.pixel_lengths[:row].sum()):][:len(ref)], ref), "stored bytes"
        assert torch.equal(got[row], decode_jpeg_batch(ref, torch.tensor([len(ref)]), torch.device("cpu"))[0])


def test_resume_and_verify_guard_pixels(data, tmp_path):
    tsv = data["tsv"]
    out = write(tsv, tmp_path / "c", "--views", "2", "--mixup-views", "1", "--pixels", "16")
    before = shard_records(out)
    (out / "shards" / "00001" / "image_pixels.npy").unlink()  # an interrupted second shard
    cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tsv), "--out", str(out),
                "--num-workers", "0", "--batch-size", "4", "--shard-size", "5", "--device", "cpu", "--views", "2",
                "--mixup-views", "1", "--pixels", "16"])
    assert shard_records(out) == before, "resumed cache must have the same bytes"
    # flip one pixel byte: sha256 catches it (a small array: hashed at open in the size mode too)
    path = out / "shards" / "00000" / "image_pixels.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    for mode in ("size", "full"):
        with pytest.raises(CacheCorruptError, match="sha256"):
            TeacherCache(out, verify=mode)
    # a stale pixel array (right bytes, wrong content) fails --verify's recomputation
    arr = np.load(path)
    arr[0, 0] = 255 - arr[0, 0]
    np.save(path, arr)
    teacher, ds = create_teacher("toy:0", "cpu"), load_dataset(str(tsv))
    with pytest.raises(CacheError, match="pixels of image 0"):
        verify_pixels(TeacherCache(out, verify="none"), np.array([0]), 0, [ds.load_image(0)], ["image 0"])
    # another pixel setting is another cache
    with pytest.raises(CacheError, match="settings"):
        write(tsv, out, "--views", "2", "--mixup-views", "1", "--pixels", "24")


def test_size_estimate_printed_before_writing(data, tmp_path, monkeypatch, capsys):
    seen: list[str] = []
    real = cache_run.write_shard

    def spy(*a, **k):
        seen.append(capsys.readouterr().err)
        return real(*a, **k)

    monkeypatch.setattr(cache_run, "write_shard", spy)
    out = write(data["tsv"], tmp_path / "c", "--views", "4", "--mixup-views", "2", "--pixels", "32")
    assert seen and "estimated cache size:" in seen[0] and "image_pixels" in seen[0] and "12 images x 6 views" in seen[0]
    est = float(seen[0].split("estimated cache size:")[1].split("MB")[0])
    total = TeacherCache(out).describe()["total_bytes"] / 1e6
    # .npy headers and per-batch caption padding are not in the estimate
    assert est == pytest.approx(total, rel=0.1), (est, total)
    assert "warning: a shard" not in seen[0]
    monkeypatch.setattr(cache_run, "SHARD_MEMORY_WARN", 1e5)
    monkeypatch.setattr(cache_run, "SHARD_MEMORY_WARN", 2e6)  # 12 images, 1e6 B each: a 6-image shard holds 6 MB
    cache_run.print_size_estimate({"image_pixels": 12e6}, load_dataset(str(data["tsv"])), CacheSettings(shard_size=6))
    assert "in memory while it is computed: ~6 MB; pass a smaller --shard-size (e.g. 2)" in capsys.readouterr().err
    pixels = next(line for line in seen[0].splitlines() if "image_pixels" in line)
    assert float(pixels.split()[1]) == pytest.approx(12 * 6 * 32 * 32 * 3 / 1e6, abs=0.01)


def test_view_tokens_options(data, tmp_path):
    tsv = data["tsv"]
    same = TeacherCache(write(tsv, tmp_path / "same", "--views", "3", "--view-tokens", "same"))
    assert same.images([0, 1], [2, 1]).tokens.shape == (2, 16, 24) and same.token_grid() == (4, 4)
    none = TeacherCache(write(tsv, tmp_path / "none", "--views", "3", "--view-tokens", "none"))
    assert none.images([0, 1], [2, 0]).tokens is None and none.token_grid() is None
    assert none.images([0, 1], 0, tokens="full").tokens.shape == (2, 16, 24)
    with pytest.raises(CacheError, match="view 0 only"):
        none.images([0, 1], [0, 1], tokens="full")
    grid = TeacherCache(data["raw"])
    pooled = grid.images([3], 0).tokens
    full = grid.images([3], 0, tokens="full").tokens
    ref = full.reshape(1, 2, 2, 2, 2, 24).mean(dim=(2, 4)).reshape(1, 4, 24)  # 4x4 -> 2x2 average pool
    assert torch.allclose(pooled, ref, atol=2e-3)
    with pytest.raises(ValueError, match="view-tokens"):
        resolve_view_tokens("topk:2", parse_token_mode("full"), 3)


@pytest.mark.slow
def test_train_student_picks_pixels_and_trains_on_mixup_views(data, tmp_path, capsys):
    tsv = data["tsv"]
    out = tmp_path / "run"
    # the token term reads the cache's pooled view tokens (it is not in the default loss set)
    summary = ts.train_from_argv(train_args(data["raw"], tsv, out, 4, "--set",
                                            "losses=[contrastive_distill, token, student_clip]"))
    assert "student pixels read from the cache (raw, 32 px)" in capsys.readouterr().out
    recs = read_log(out)
    assert summary.steps == 4 and summary.skipped_nonfinite == 0 and len(recs) == 4
    assert all(np.isfinite(r["total"]) and np.isfinite(r["loss/token"]) for r in recs)
    # the 4 steps x 4 images drew mixup views (the training set draws from all 5 cached views)
    run = ts.setup(ts.config_from_args(ts.build_parser().parse_args(train_args(data["raw"], tsv, out, 4))),
                   init_distributed("cpu"))
    drawn = {run.loader.dataset.choose(i, e)[1] for e in range(2) for i in range(12)}
    assert drawn & {3, 4} and drawn & {0, 1, 2}
    # jpeg cache on CPU: decoded in the training step
    summary = ts.train_from_argv(train_args(data["jpeg"], tsv, tmp_path / "run2", 2))
    assert "(jpeg, 24 px)" in capsys.readouterr().out and summary.skipped_nonfinite == 0
    # data.pixels=decode ignores them; data.pixels=cache requires them
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(data["raw"], tsv, tmp_path / "u", 2,
                                                                      "--set", "data.pixels=decode")))
    assert ts.setup(cfg, init_distributed("cpu")).loader.dataset.pixel_source == "decode"
    plain = write(tsv, tmp_path / "plain", "--views", "2")
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(plain, tsv, tmp_path / "u", 2,
                                                                      "--set", "data.pixels=cache")))
    with pytest.raises(PixelCacheError, match="holds no pixels"):
        ts.setup(cfg, init_distributed("cpu"))
