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

from distill.cache import CacheCorruptError, CacheMismatchError, CacheVerifyError, CacheWriteError, ManifestError, TeacherCache
from distill.cache_teacher import main, verify_cache
from distill.data import BadSampleError, load_dataset
from teachers import TEACHERS, build_teacher
from tests.conftest import REPO, make_tiny_dataset
from tests.test_cache import BASE, build, tree_bytes
from tests.toy_teacher import ToyTeacher


class SlowToyTeacher(ToyTeacher):
    def encode_image(self, pixels, layers=()):
        time.sleep(0.25)
        return super().encode_image(pixels, layers)


if "slowtoy" not in TEACHERS:
    TEACHERS.register("slowtoy")(lambda rest: SlowToyTeacher(seed=int(rest or 0)))


def test_resume_after_kill_matches_uninterrupted(tiny_tsv, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["--plugin", "tests.test_cache_faults", "--teacher", "slowtoy:0", "--data", str(tiny_tsv), "--batch-size", "2",
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


def test_bit_flip_detected_by_full_verify(tiny_tsv, tmp_path):
    out = tmp_path / "c"
    build(tiny_tsv, out)
    target = out / "shards" / "00002" / "text_embed.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    TeacherCache(out)  # sizes still match: the cheap default check cannot see it
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
        cache.check(teacher_hash=build_teacher("toy:1").config_hash())
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
    assert TeacherCache(out).teacher_hash == build_teacher("toy:1").config_hash()


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
    assert verify_cache(out, build_teacher("toy:0"), ds, 4)["image embed"] > 0.999
    with pytest.raises(CacheVerifyError, match=r"cached image embed of image \d+ view 0 .*cosine"):
        verify_cache(out, build_teacher("toy:1"), ds, 4)
