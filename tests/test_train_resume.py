"""Exact resume: a run killed after its step-k checkpoint and resumed with ``--resume`` logs the
bit-identical loss trajectory (and ends with identical weights) as an uninterrupted run."""
from __future__ import annotations

import pytest

from distill.pipeline.train import main as ts
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import ResumeMismatchError
from distill.pipeline.train.log import read_log
from tests.helpers.training import assert_same_training_state, die_at, train_args

STEPS, KILL_AT = 7, 5  # checkpoints every 3 steps: the killed run resumes from step 3 and redoes 4..5


def _trajectory(out):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s",)} for r in read_log(out)]


def test_killed_run_resumes_bitwise(tiny, tmp_path, monkeypatch):
    tsv, cache = tiny  # 2 cached views: the view/caption draws must resume too
    extra = ("--set", "train.accum_steps=2", "--set", "train.checkpoint_every=3")
    ts.main(train_args(cache, tsv, tmp_path / "full", STEPS, *extra))

    die_at(monkeypatch, KILL_AT)
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, tmp_path / "cut", STEPS, *extra))
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [1, 2, 3, 4, 5]
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 3 and ckpt["sampler"] == {"epoch": 1, "position": 3}  # 6 micro-batches, 3 per epoch
    monkeypatch.undo()

    ts.main(train_args(cache, tsv, tmp_path / "cut", STEPS, *extra, "--resume", "auto"))
    full, resumed = _trajectory(tmp_path / "full"), _trajectory(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert resumed == full  # every loss, weight, lr and grad norm, bit for bit

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")
    assert_same_training_state(a, b)


def test_resume_auto_without_checkpoint_starts_fresh(tiny, tmp_path):
    tsv, cache = tiny
    summary = ts.train_from_argv(train_args(cache, tsv, tmp_path / "run", 2, "--resume"))
    assert summary.steps == 2 and [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_resume_with_another_student_is_refused(tiny, tmp_path):
    tsv, cache = tiny
    ts.main(train_args(cache, tsv, tmp_path / "run", 2))
    with pytest.raises(ResumeMismatchError, match="differs from the configured student"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 4, "--set", "student.vision_layers=1", "--resume"))
