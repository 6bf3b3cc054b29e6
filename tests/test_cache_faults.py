"""Teacher cache failure modes: kill -9 + resume, corruption, mismatches, disk full, bad samples.

Importing this module also registers ``slowtoy:<seed>`` (the toy teacher, sleeping per image
batch) so that a subprocess run can be killed part-way: ``--plugin tests.test_cache_faults``.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distill.core.cache.reader import TeacherCache
from distill.core.errors import BadSampleError, CacheCorruptError, CacheMismatchError, CacheVerifyError, CacheWriteError, ManifestError
from distill.pipeline.cache.main import main
from distill.pipeline.cache.teacher import verify_cache
from distill.core.data.factory import load_dataset
from teachers import TEACHERS, create_teacher
from tests.helpers.registry import registered
from tests.helpers.caches import BASE, build, tree_bytes
from tests.helpers.data import make_tiny_dataset
from tests.helpers.paths import REPO
from tests.helpers.procs import unused_pid
from tests.helpers.toy_teachers import ToyTeacher


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_tsv, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["--plugin", "tests.helpers.toy_teachers", "--teacher", "slowtoy:0", "--data", str(tiny_tsv), "--batch-size", "2",
            "--shard-size", "4", "--num-workers", "1", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "distill.cache_teacher", *args, "--out", str(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shards" / "00000" / "shard.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "first shard never appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "manifest.json").exists() and not (out / "shards" / "00002").exists()
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "reused" in summary and "(3 computed" not in summary
    assert not list((out / "shards").glob("*.tmp-*"))
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_truncated_shard_file_is_named(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    target = out / "shards" / "00001" / "image_tokens.npy"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match=r"shards/00001/image_tokens\.npy.*truncated"):
        TeacherCache(out)


def test_bit_flip_detected_by_full_verify(tiny_tsv, tmp_path, monkeypatch):
    import distill.core.cache.reader as cache_mod

    monkeypatch.setattr(cache_mod, "SMALL_ARRAY_BYTES", 0)  # as in a large array (small ones: test_bad_inputs)
    out = tmp_path / "c"
    build(tiny_tsv, out)
    target = out / "shards" / "00002" / "text_embed.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    TeacherCache(out, verify="size")  # sizes still match: the cheap check cannot see it
    with pytest.raises(CacheCorruptError, match=r"shards/00002/text_embed\.npy: sha256 mismatch"):
        TeacherCache(out, verify="full")


def test_missing_shard_file_is_named(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    (out / "shards" / "00000" / "text_mask.npy").unlink()
    with pytest.raises(CacheCorruptError, match=r"missing cache file .*shards/00000/text_mask\.npy"):
        TeacherCache(out)


def test_malformed_manifest(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON"):
        TeacherCache(out)
    (out / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ManifestError, match=r"manifest\.json: missing field\(s\) teacher"):
        TeacherCache(out)
    with pytest.raises(ManifestError, match="not a teacher cache"):
        TeacherCache(tmp_path)


def test_mismatched_teacher_dataset_or_settings(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    cache = build(tiny_tsv, out)
    with pytest.raises(CacheMismatchError, match="teacher"):
        cache.check(teacher_hash=create_teacher("toy:1").config_hash())
    with pytest.raises(CacheMismatchError, match="dataset"):
        cache.check(dataset_fingerprint="0" * 64)
    toy1 = [a if a != "toy:0" else "toy:1" for a in BASE]
    with pytest.raises(CacheMismatchError, match=r"teacher \(config_hash\).*--overwrite"):
        main([*toy1, "--data", str(tiny_tsv), "--out", str(out)])
    other = make_tiny_dataset(tmp_path / "other", n_images=6, seed=3)
    with pytest.raises(CacheMismatchError, match=r"dataset \(fingerprint\)"):
        main([*BASE, "--data", str(other), "--out", str(out)])
    with pytest.raises(CacheMismatchError, match="storage/view/shard settings"):
        main([*BASE, "--data", str(tiny_tsv), "--out", str(out), "--dtype", "int8"])
    (out / "manifest.json").unlink()  # shards alone still identify the run that wrote them
    with pytest.raises(CacheMismatchError, match=r"shards/00000/shard\.json"):
        main([*toy1, "--data", str(tiny_tsv), "--out", str(out)])
    assert main([*toy1, "--data", str(tiny_tsv), "--out", str(out), "--overwrite"]) == 0
    assert TeacherCache(out).teacher_hash == create_teacher("toy:1").config_hash()


def test_disk_full_keeps_complete_shards(tiny_tsv, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_save = np.save
    calls = {"n": 0}

    def failing_save(file, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] > 9:  # shard 0 holds 6 arrays; fail inside shard 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(CacheWriteError, match=r"writing shard .*shards/00001 failed: .*No space left.*rerun"):
        main([*BASE, "--data", str(tiny_tsv), "--out", str(out)])
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]
    assert not (out / "manifest.json").exists()
    shard0 = tree_bytes(out / "shards" / "00000")
    build(tiny_tsv, out)
    build(tiny_tsv, tmp_path / "clean")
    assert tree_bytes(out / "shards" / "00000") == shard0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_bad_image_error_then_skip(tmp_path, capsys):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=12)
    (tmp_path / "d" / "images" / "img010.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "c"
    with pytest.raises(BadSampleError, match=r"captions\.tsv:22: cannot decode image .*img010\.jpg"):
        main([*BASE, "--data", str(tsv), "--out", str(out)])
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00001"]  # completed shards stay
    capsys.readouterr()
    assert main([*BASE, "--data", str(tsv), "--out", str(out), "--on-bad-sample", "skip", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "11 images, 22 captions" in captured.out and "2 samples skipped" in captured.out
    assert "img010.jpg" in captured.err
    cache = TeacherCache(out)
    skipped = cache.manifest["dataset"]["skipped"]
    assert [s["where"] for s in skipped] == [f"{tsv}:22", f"{tsv}:23"]
    assert cache.num_images == 11


def test_verify_detects_wrong_teacher(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    ds = load_dataset(tiny_tsv)
    assert verify_cache(out, create_teacher("toy:0"), ds, 4)["image embed"] > 0.999
    with pytest.raises(CacheVerifyError, match=r"cached image embed of image \d+ view 0 .*cosine"):
        verify_cache(out, create_teacher("toy:1"), ds, 4)


# -- non-finite / fp16-overflowing teacher outputs (issue 13.1) ---------------------------------
class NaNToyTeacher(ToyTeacher):
    """NaN in column 0 of image_embed for the 3rd image batch (shard 1's first batch with BASE);
    single-image forwards (the writer's layer probe and size estimate) are not counted."""

    calls = 0

    def encode_image(self, pixels, layers=()):
        f = super().encode_image(pixels, layers)
        if pixels.shape[0] == 1:
            return f
        NaNToyTeacher.calls += 1
        if NaNToyTeacher.calls == 3:
            f.embed[:, 0] = float("nan")
        return f


class BigToyTeacher(ToyTeacher):
    """Image tokens scaled beyond the fp16 range."""

    def encode_image(self, pixels, layers=()):
        f = super().encode_image(pixels, layers)
        f.tokens = f.tokens * 1e6
        return f


@pytest.fixture
def nantoy():
    with registered(TEACHERS, "nantoy", NaNToyTeacher):
        yield


@pytest.fixture
def bigtoy():
    with registered(TEACHERS, "bigtoy", BigToyTeacher):
        yield


def _with_teacher(spec):
    return [a if a != "toy:0" else spec for a in BASE]


def test_nonfinite_output_refused_naming_array_shard_count(tiny_tsv, tmp_path, nantoy):
    from distill.core.errors import NonFiniteOutputError

    out = tmp_path / "c"
    NaNToyTeacher.calls = 0
    with pytest.raises(NonFiniteOutputError, match=r"shard .*shards/00001: .*non-finite .*image_embed: 3\b"):
        main([*_with_teacher("nantoy:0"), "--data", str(tiny_tsv), "--out", str(out)])
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]  # shard 0 kept, nothing of shard 1
    assert not (out / "manifest.json").exists()


def test_nonfinite_report_stores_counts_and_verify_fails_on_nan(tiny_tsv, tmp_path, capsys, nantoy):
    out = tmp_path / "c"
    NaNToyTeacher.calls = 0
    assert main([*_with_teacher("nantoy:0"), "--data", str(tiny_tsv), "--out", str(out), "--nonfinite", "report"]) == 0
    assert "stored non-finite teacher outputs (--nonfinite report): image_embed 3" in capsys.readouterr().err
    cache = TeacherCache(out)
    checks = [s["output_check"] for s in cache.manifest["shards"]]
    assert [c["image_embed"]["nonfinite"] for c in checks] == [0, 3, 0]
    assert all(c["text_embed"] == {"nonfinite": 0, "overflow": 0} for c in checks)
    assert torch_isnan_rows(cache) == [5, 6, 7]
    # rerunning in error mode does not silently reuse the shard that holds NaN: it refuses it
    from distill.core.errors import NonFiniteOutputError
    NaNToyTeacher.calls = 2  # only shard 1 is recomputed: its first batch is the NaN one again
    with pytest.raises(NonFiniteOutputError, match="00001"):
        main([*_with_teacher("nantoy:0"), "--data", str(tiny_tsv), "--out", str(out)])
    # --verify treats a NaN cosine as a failure (nan < thr is False)
    with pytest.raises(CacheVerifyError, match=r"cached image embed of image [567] view 0 .*cosine nan"):
        verify_cache(out, create_teacher("toy:0"), load_dataset(tiny_tsv), 12)


def torch_isnan_rows(cache):
    import torch

    return torch.nonzero(torch.isnan(cache.images(range(cache.num_images)).embed).any(1)).flatten().tolist()


def test_fp16_overflow_refused_then_stored_wide(tiny_tsv, tmp_path, capsys, bigtoy):
    import torch

    from distill.core.errors import FP16OverflowError
    from tests.helpers.caches import teacher_images

    with pytest.raises(FP16OverflowError, match=r"shards/00000: .*fp16 range .*image_tokens: \d+"):
        main([*_with_teacher("bigtoy:0"), "--data", str(tiny_tsv), "--out", str(tmp_path / "e")])
    ds = load_dataset(tiny_tsv)
    ref = teacher_images(BigToyTeacher(seed=0), ds, [0, 6, 11]).tokens
    assert ref.abs().max() > 65504
    for mode, tol in (("fp32", 0.0), ("bf16", 2 ** -8)):
        out = tmp_path / mode
        assert main([*_with_teacher("bigtoy:0"), "--data", str(tiny_tsv), "--out", str(out), "--overflow", mode]) == 0
        assert "fp16 overflow, stored wider: image_tokens" in capsys.readouterr().err
        cache = TeacherCache(out, verify="full")
        check = cache.manifest["shards"][0]["output_check"]["image_tokens"]
        assert check["stored_as"] == mode and check["overflow"] > 0
        rec = cache.manifest["shards"][0]["arrays"]["image_tokens"]
        assert rec["dtype"] == ("float32" if mode == "fp32" else "uint16")
        assert rec.get("encoding") == (None if mode == "fp32" else "bfloat16")
        assert cache.manifest["shards"][0]["arrays"]["image_embed"]["dtype"] == "float16"  # only the overflowing array
        for keep in (False, True):
            got = cache.images([0, 6, 11], keep_fp16=keep).tokens
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            if tol == 0:
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)  # the toy's float32 output, exactly
            else:
                assert ((got - ref).abs() <= tol * ref.abs() + 1e-3).all()


# -- integrity by default (issue 13.4) ------------------------------------------------------------
def test_default_lazy_verify_catches_bit_flip_on_first_read(tiny_tsv, tmp_path, monkeypatch):
    import distill.core.cache.reader as cache_mod

    monkeypatch.setattr(cache_mod, "SMALL_ARRAY_BYTES", 0)  # as in a large array (small ones: test_bad_inputs)
    out = tmp_path / "c"
    build(tiny_tsv, out)  # ~2 kB per image: "auto" (the default) picks lazy
    target = out / "shards" / "00001" / "image_embed.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    cache = TeacherCache(out)  # opening only checks sizes ...
    assert cache.verify == "lazy"
    cache.images([0, 1])  # ... shard 0 is intact ...
    with pytest.raises(CacheCorruptError, match=r"shards/00001/image_embed\.npy: sha256 mismatch"):
        cache.images([6])  # ... the first read of shard 1's image_embed hashes it
    cache.texts([12])  # other arrays of shard 1 are fine
    TeacherCache(out, verify="size").images([6])  # the explicit cheap mode still returns the flipped bytes


def test_auto_verify_is_size_for_large_caches(tiny_tsv, tmp_path, monkeypatch):
    import distill.core.cache.reader as cache_mod

    out = tmp_path / "c"
    build(tiny_tsv, out)
    per_image = sum(e["bytes"] for s in TeacherCache(out).manifest["shards"] for e in s["arrays"].values()) / 12
    monkeypatch.setattr(cache_mod, "LAZY_MAX_BYTES_PER_IMAGE", int(per_image) - 1)
    assert TeacherCache(out).verify == "size"
    monkeypatch.setattr(cache_mod, "LAZY_MAX_BYTES_PER_IMAGE", int(per_image) + 1)
    assert TeacherCache(out).verify == "lazy"


def test_train_student_verify_cache_flag_and_config():
    from distill.pipeline.train.config import resolve_config
    from distill.core.errors import ConfigError
    from distill.pipeline.train.main import build_parser, config_from_args

    args = build_parser().parse_args(["--cache", "c", "--data", "d", "--verify-cache", "full"])
    assert config_from_args(args)["data"]["verify_cache"] == "full"
    assert resolve_config()["data"]["verify_cache"] == "auto"
    with pytest.raises(ConfigError, match="data.verify_cache must be one of none, size, lazy, full, auto"):
        resolve_config(overrides=["data.verify_cache=sha"])


def test_second_writer_is_refused_naming_the_first(tiny_tsv, tmp_path):
    from distill.core.lock import LOCK_NAME, writer_lock
    from distill.core.errors import CacheLockedError

    out = tmp_path / "c"
    out.mkdir()
    with writer_lock(out):
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        for extra in ([], ["--overwrite"]):
            with pytest.raises(CacheLockedError, match=rf"being written by process {os.getpid()} on host .*{LOCK_NAME}"):
                main([*BASE, "--data", str(tiny_tsv), "--out", str(out), *extra])
        assert not (out / "shards").exists()  # the refused run touched nothing
    assert not (out / LOCK_NAME).exists()
    build(tiny_tsv, out)
    assert not (out / LOCK_NAME).exists()  # released after a run


def test_stale_lock_of_dead_process_is_taken_over(tiny_tsv, tmp_path, capsys):
    import socket

    from distill.core.lock import LOCK_NAME

    dead = unused_pid()
    out = tmp_path / "c"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    build(tiny_tsv, out)
    assert f"taking over stale lock {out / LOCK_NAME} of process {dead}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": "some-other-host", "started": "x"}))
    from distill.core.errors import CacheLockedError
    with pytest.raises(CacheLockedError, match="some-other-host"):  # another host's pid cannot be checked
        build(tiny_tsv, out)


@pytest.mark.parametrize("err, advice", [
    (errno.ENOSPC, "free disk space"),
    (errno.EACCES, "make the --out folder writable"),
    (errno.ENOENT, "another process"),
])
def test_write_error_advice_matches_cause(tiny_tsv, tmp_path, monkeypatch, err, advice):
    real_save = np.save

    def failing_save(file, arr, *a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(CacheWriteError, match=rf"shards/00000 failed: .*{os.strerror(err)}.*{advice}") as e:
        main([*BASE, "--data", str(tiny_tsv), "--out", str(tmp_path / "c")])
    monkeypatch.setattr(np, "save", real_save)
    if err != errno.ENOSPC:
        assert "free" not in str(e.value)


def test_replaced_image_makes_its_shard_stale(tiny_tsv, tmp_path, capsys):
    from distill.core.errors import StaleCacheError

    out = tmp_path / "c"
    build(tiny_tsv, out)
    before = tree_bytes(out / "shards")
    ds = load_dataset(tiny_tsv)
    cache = TeacherCache(out)
    cache.check_images(ds.stats_digest)  # unchanged: fine
    img = tiny_tsv.parent / "images" / "img007.jpg"  # shard 1 (images 5..9)
    other = (tiny_tsv.parent / "images" / "img003.jpg").read_bytes()
    img.write_bytes(other)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert load_dataset(tiny_tsv).fingerprint() == ds.fingerprint()  # same names and captions ...
    with pytest.raises(StaleCacheError, match=r"1 shard\(s\), first shards/00001 \(images 5\.\.9\).*rerun"):
        TeacherCache(out).check_images(ds.stats_digest)  # ... but the shard is stale
    capsys.readouterr()
    build(tiny_tsv, out)
    assert "(1 computed, 2 reused" in capsys.readouterr().out
    after = tree_bytes(out / "shards")
    assert {k for k in after if after[k] != before.get(k)} >= {"00001/image_embed.npy"}
    assert all(after[k] == before[k] for k in after if k.startswith(("00000/", "00002/")))
    TeacherCache(out).check_images(load_dataset(tiny_tsv).stats_digest)


def test_stat_cost_over_flickr8k_is_small(flickr8k):
    ds = load_dataset(flickr8k)
    t0 = time.perf_counter()
    ds.stats_digest()
    assert time.perf_counter() - t0 < 2.0  # ~8k stat() calls


def test_train_student_refuses_a_cache_older_than_its_images(tiny_tsv, tmp_path):
    from distill.pipeline.train import main as ts
    from distill.core.errors import StaleCacheError
    from tests.helpers.caches import build_cache as train_cache
    from tests.helpers.training import train_args

    cache = train_cache(tiny_tsv, tmp_path / "c")
    img = tiny_tsv.parent / "images" / "img002.jpg"
    img.write_bytes((tiny_tsv.parent / "images" / "img009.jpg").read_bytes())  # replaced under the same name
    with pytest.raises(StaleCacheError, match=r"changed size or modification time after the cache was built.*rerun"):
        ts.main(train_args(cache, tiny_tsv, tmp_path / "run", 1))
    assert not (tmp_path / "run" / "checkpoints").exists()
    summary = ts.train_from_argv(train_args(cache, tiny_tsv, tmp_path / "run2", 1, "--verify-cache", "none"))  # explicit opt-out
    assert summary.steps == 1
