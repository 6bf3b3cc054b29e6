"""Training failure modes not covered elsewhere: a real ``kill -9`` of a training process then
``--resume``, a torn last log line, disk full while checkpointing, a truncated checkpoint, and a
corrupted cache shard at start-up.

Importing this module with ``MMDISTILL_TEST_STEP_SLEEP=<s>`` set slows every training step by
``s`` seconds, so that a subprocess run (``--plugin tests.test_faults_train``) can be killed
between two checkpoints.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill import checkpoint as ck
from distill import train_student as ts
from distill.cache import CacheCorruptError
from distill.checkpoint import CheckpointError, load_checkpoint
from distill.train_log import LOG_NAME, read_log
from tests.conftest import REPO
from tests.test_train import tiny, train_args  # noqa: F401  (module fixture)
from tests.test_train_resume import die_at

STEPS = 7
EXTRA = ("--set", "train.checkpoint_every=3")  # checkpoints after steps 3 and 6 (and 7, the last)

if os.environ.get("MMDISTILL_TEST_STEP_SLEEP"):
    _real_step, _delay = ts.train_step, float(os.environ["MMDISTILL_TEST_STEP_SLEEP"])

    def _slow_step(run, batches, step):
        time.sleep(_delay)
        return _real_step(run, batches, step)

    ts.train_step = _slow_step


def _trajectory(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(out)]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "latest.pt")["student"]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted run of STEPS steps."""
    tsv, cache = tiny
    out = tmp_path_factory.mktemp("reference") / "run"
    ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))
    assert _trajectory(out) == _trajectory(reference)  # losses, weights, lr, grad norms: bit for bit
    ref = _final_weights(reference)
    for k, v in _final_weights(out).items():
        assert torch.equal(v, ref[k]), k


def test_kill9_of_training_process_then_resume_is_identical(tiny, reference, tmp_path):  # noqa: F811
    tsv, cache = tiny
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill.train_student", *train_args(cache, tsv, out, STEPS, *EXTRA),
           "--plugin", "tests.test_faults_train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MMDISTILL_TEST_STEP_SLEEP": "0.5"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step_000003.pt"
    deadline = time.time() + 180
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the first checkpoint never appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (out / "checkpoints" / "step_000006.pt").exists() and not (out / "student").exists()
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 3

    summary = ts.main(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    assert summary["steps"] == STEPS
    _assert_same_run(out, reference)


def test_torn_last_log_line_after_kill_is_dropped_on_resume(tiny, reference, tmp_path, monkeypatch):  # noqa: F811
    tsv, cache = tiny
    out = tmp_path / "torn"
    die_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    with open(out / LOG_NAME, "a", encoding="utf-8") as f:  # a kill in the middle of a write
        f.write('{"kind": "train", "step": 5, "lo')
    monkeypatch.undo()
    ts.main(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    _assert_same_run(out, reference)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, reference, tmp_path, monkeypatch):  # noqa: F811
    tsv, cache = tiny
    out = tmp_path / "full_disk"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if obj.get("step") == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step_000006\.pt failed: .*No space left"):
        ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    monkeypatch.undo()
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_000003.pt"]  # no partial file left
    assert load_checkpoint(folder / "latest.pt")["step"] == 3
    ts.main(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    _assert_same_run(out, reference)


def test_truncated_checkpoint_is_named(tiny, tmp_path):  # noqa: F811
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    latest = out / "checkpoints" / "latest.pt"
    data = (out / "checkpoints" / "step_000003.pt").read_bytes()
    latest.unlink()  # a hard link to step_000003.pt: replace it by a truncated copy
    latest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoints/latest\.pt"):
        ts.main(train_args(cache, tsv, out, 5, *EXTRA, "--resume", "auto"))
    assert load_checkpoint(out / "checkpoints" / "step_000003.pt")["step"] == 3  # the intact file still loads


def test_truncated_cache_shard_is_named_before_training(tmp_path):
    from tests.conftest import make_tiny_dataset
    from tests.test_train import build_cache

    tsv = make_tiny_dataset(tmp_path / "data", n_images=8)
    cache = build_cache(tsv, tmp_path / "cache")
    target = cache / "shards" / "00000" / "image_tokens.npy"
    target.write_bytes(target.read_bytes()[:-64])
    with pytest.raises(CacheCorruptError, match=r"shards/00000/image_tokens\.npy"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 2))
    assert not (tmp_path / "run" / "checkpoints").exists()
