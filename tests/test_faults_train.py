"""Training failure modes not covered elsewhere: a real ``kill -9`` of a training process then
``--resume``, a torn last log line, disk full while checkpointing, truncated / bit-flipped / missing
checkpoints (checksums, fallback to the newest intact one), rerunning into a finished run, a cache of
another teacher on resume, stray temporary files, non-finite teacher targets (error / skip) and
non-finite loss terms, and a corrupted cache shard at start-up.

Subprocess runs load ``--plugin tests.helpers.train_hooks`` to be slowed down (killed between two
checkpoints) or to get poisoned teacher targets.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core import checkpoint as ck
from distill.pipeline.train import main as ts
from distill.core.errors import CacheCorruptError, CheckpointCorruptError, CheckpointError, ManifestError, NonFiniteTargetError, ResumeMismatchError, RunFolderError
from distill.core.checkpoint import load_checkpoint
from distill.losses import LOSSES, DistillBatch, DistillLoss, Dims
from distill.pipeline.train.data import GlobalBatchSampler
from distill.pipeline.train.log import LOG_NAME, read_log
from tests.helpers.caches import edit_manifest
from tests.helpers.paths import REPO
from tests.helpers.procs import unused_pid
from tests.helpers.registry import registered
from tests.helpers.training import BAD_IMAGES, die_at, poison_targets, train_args

STEPS = 7
EXTRA = ("--set", "train.checkpoint_every=3")  # checkpoints after steps 3 and 6 (and 7, the last)


def _trajectory(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(out)]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "latest.pt")["student"]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
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


@pytest.mark.slow
def test_kill9_of_training_process_then_resume_is_identical(tiny, reference, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill.train_student", *train_args(cache, tsv, out, STEPS, *EXTRA),
           "--plugin", "tests.helpers.train_hooks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MMDISTILL_TEST_STEP_SLEEP": "0.5"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "latest.pt"  # written (a copy of step_000003.pt) right after the step file
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

    summary = ts.train_from_argv(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    assert summary.steps == STEPS
    _assert_same_run(out, reference)


def test_torn_last_log_line_after_kill_is_dropped_on_resume(tiny, reference, tmp_path, monkeypatch):
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


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, reference, tmp_path, monkeypatch):
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


def test_truncated_latest_falls_back_to_the_step_file_and_an_explicit_path_is_named(tiny, tmp_path, capsys):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    latest = out / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoints/latest\.pt"):
        ts.main(train_args(cache, tsv, out, 5, *EXTRA, "--resume", str(latest)))
    assert load_checkpoint(out / "checkpoints" / "step_000003.pt")["step"] == 3  # a copy, not a link: intact
    summary = ts.train_from_argv(train_args(cache, tsv, out, 5, *EXTRA, "--resume", "auto"))  # step files first
    assert summary.steps == 5 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def test_byte_flips_in_a_checkpoint_are_detected(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    step = out / "checkpoints" / "step_000003.pt"
    latest = out / "checkpoints" / "latest.pt"
    assert step.stat().st_nlink == 1 and latest.stat().st_nlink == 1  # latest.pt is a copy, never a hard link
    original, good = step.read_bytes(), load_checkpoint(step)
    rng = np.random.default_rng(0)
    detected = 0
    for at in rng.choice(len(original), size=30, replace=False):
        _flip(step, int(at))
        try:
            state = load_checkpoint(step)
        except CheckpointCorruptError:
            detected += 1
        else:  # a flip that changes nothing loaded (e.g. zip padding) is harmless; a change never passes
            assert state["checksum"] == good["checksum"]
            for k, v in good["student"].items():
                assert torch.equal(v, state["student"][k]), (int(at), k)
        step.write_bytes(original)
    assert detected >= 25, detected
    _flip(latest, len(original) // 2)
    assert load_checkpoint(step)["step"] == 3  # damage to latest.pt never reaches the step file


def test_corrupt_newest_checkpoint_resumes_from_the_newest_intact_one(tiny, reference, tmp_path, monkeypatch,
                                                                      capsys):
    tsv, cache = tiny
    out = tmp_path / "flipped"
    die_at(monkeypatch, 6)  # checkpoints after steps 3 and 6, then killed
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    monkeypatch.undo()
    folder = out / "checkpoints"
    newest = folder / "step_000006.pt"
    _flip(newest, newest.stat().st_size // 2)
    _flip(folder / "latest.pt", newest.stat().st_size // 3)
    capsys.readouterr()
    ts.main(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    err = capsys.readouterr().err
    assert "step_000006.pt is corrupt" in err and f"resuming from {folder / 'step_000003.pt'}" in err
    _assert_same_run(out, reference)


def test_missing_latest_resumes_from_the_newest_step_file(tiny, reference, tmp_path, monkeypatch):
    tsv, cache = tiny
    out = tmp_path / "nolatest"
    die_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    monkeypatch.undo()
    (out / "checkpoints" / "latest.pt").unlink()
    ts.main(train_args(cache, tsv, out, STEPS, *EXTRA, "--resume", "auto"))
    _assert_same_run(out, reference)  # resumed at step 3, not restarted at step 1


def test_every_checkpoint_corrupt_is_refused_naming_them(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    for p in (out / "checkpoints").glob("*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=r"no intact checkpoint .*step_000003\.pt.*latest\.pt"):
        ts.main(train_args(cache, tsv, out, 5, *EXTRA, "--resume", "auto"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]  # the log is untouched


def test_rerun_into_a_finished_run_is_refused_unless_resume_or_overwrite(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 7, *EXTRA))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=r"already holds a training run .*--resume auto .*--overwrite"):
        ts.main(train_args(cache, tsv, out, 2, *EXTRA))
    assert len(read_log(out)) == 7 and sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    with pytest.raises(RunFolderError, match="exclude each other"):
        ts.main(train_args(cache, tsv, out, 2, *EXTRA, "--resume", "auto", "--overwrite"))
    with pytest.raises(ManifestError):  # --overwrite with an input that does not load deletes nothing
        ts.main(train_args(tmp_path / "no_cache", tsv, out, 2, *EXTRA, "--overwrite"))
    assert len(read_log(out)) == 7 and sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    summary = ts.train_from_argv(train_args(cache, tsv, out, 2, *EXTRA, "--overwrite"))
    assert summary.steps == 2 and [r["step"] for r in read_log(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step_000002.pt"]


def test_resume_on_a_cache_of_another_teacher_is_refused(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    other = tmp_path / "other_cache"
    shutil.copytree(cache, other)
    edit_manifest(other, lambda m: m["teacher"].update(config_hash="f" * 64))  # as if rebuilt with another teacher
    with pytest.raises(ResumeMismatchError, match=r"teacher_hash .*ffffffffffff"):
        ts.main(train_args(other, tsv, out, 5, *EXTRA, "--resume", "auto"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_stray_tmp_checkpoint_files_are_cleaned_at_start(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    dead = unused_pid()  # the writer of the leftovers is gone
    stray = [out / "checkpoints" / f".step_000006.pt.tmp-{dead}", out / "checkpoints" / f".latest.pt.tmp-{dead}"]
    for p in stray:
        p.write_bytes(b"partial")
    ts.main(train_args(cache, tsv, out, 4, *EXTRA, "--resume", "auto"))
    assert not any(p.exists() for p in stray)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step_000003.pt", "step_000004.pt"]


# ------------------------------------------------------------------------ non-finite teacher targets
@pytest.mark.parametrize("field,array", [("image.embed", "image_embed"), ("text.tokens", "text_tokens")])
def test_nonfinite_teacher_target_stops_training_naming_cache_shard_and_sample(tiny, tmp_path, monkeypatch,
                                                                               field, array):
    tsv, cache = tiny
    poison_targets(monkeypatch, field)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTargetError) as e:
        ts.main(train_args(cache, tsv, out, STEPS, *EXTRA))
    msg = str(e.value)
    what = r"image [15] view [01] \(shards/00000: image_embed\)" if array == "image_embed" else \
        r"caption [0-9]+ \(shards/00000: text_tokens\)"
    assert re.search(rf"teacher cache {re.escape(str(cache))}: non-finite .* {what}", msg), msg
    assert "data.on_nonfinite=skip" in msg
    assert not (out / "checkpoints").exists()  # stopped at the first poisoned batch (step 1 or 2)


def test_nonfinite_teacher_targets_are_skipped_and_counted_when_asked(tiny, tmp_path, monkeypatch):
    tsv, cache = tiny
    poison_targets(monkeypatch)
    out = tmp_path / "run"
    summary = ts.train_from_argv(train_args(cache, tsv, out, STEPS, *EXTRA, "--set", "data.on_nonfinite=skip"))
    sampler = GlobalBatchSampler(12, 4, seed=0)  # 3 batches per epoch: 7 steps = 2 epochs + 1 batch
    seen = [int(i) for e in range(3) for i in sampler.order(e)[:12 if e < 2 else 4]]
    expected = sum(i in BAD_IMAGES for i in seen)
    recs = read_log(out)
    assert summary.skipped_samples == expected == recs[-1]["skipped_samples"] and expected >= 4
    assert summary.skipped_nonfinite == 0 and all(np.isfinite(r["total"]) for r in recs)
    assert all(np.isfinite(r[k]) for r in recs for k in r if k.startswith("loss/"))
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["skipped_samples"] == expected


@pytest.mark.slow
def test_nonfinite_targets_under_torchrun_skip_counts_like_one_process_and_error_stops(tiny, tmp_path):
    from tests.helpers.procs import free_port

    tsv, cache = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MMDISTILL_TEST_POISON": "1"}

    def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "distill.train_student",
               *train_args(cache, tsv, out, 4, *extra), "--plugin", "tests.helpers.train_hooks"]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    proc = torchrun(tmp_path / "skip", "--set", "data.on_nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    sampler_seen = [int(i) for e in range(2) for i in GlobalBatchSampler(12, 4, seed=0).order(e)[:12 if e < 1 else 4]]
    expected = sum(i in BAD_IMAGES for i in sampler_seen)
    recs = read_log(tmp_path / "skip")
    assert recs[-1]["skipped_samples"] == expected and all(np.isfinite(r["total"]) for r in recs)
    proc = torchrun(tmp_path / "error")
    assert proc.returncode != 0, proc.stderr[-4000:]
    # every rank raises at the same step (no rank hangs in a collective); torchrun may stop the second
    # before it prints, and adds its own summary
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and all("non-finite (NaN/Inf) teacher targets" in x for x in errors), errors
    assert not (tmp_path / "error" / "checkpoints").exists()


class NanValueLoss(DistillLoss):
    """Test-only loss whose VALUE is NaN at ``bad_steps`` (the balancer gives such a term weight 0)."""

    def __init__(self, dims: Dims, bad_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bad_steps = tuple(bad_steps)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        value = (batch.s_img.embed * 0.0).sum() + 1.0
        return value * float("nan") if batch.step in self.bad_steps else value


@pytest.fixture
def nan_value_loss():
    with registered(LOSSES, "test_nan_value", NanValueLoss):
        yield


def test_step_with_a_nonfinite_loss_term_is_skipped_despite_zero_weight(tiny, tmp_path, nan_value_loss):
    tsv, cache = tiny
    out = tmp_path / "run"
    losses = "[{name: contrastive_distill, cfg: {queue_size: 16}}, {name: feature_l1}, {name: test_nan_value, cfg: {bad_steps: [1]}}]"
    ts.main(train_args(cache, tsv, out, 3, "--set", f"losses={losses}", "--set", "train.checkpoint_every=1",
                       "--set", "train.keep_checkpoints=0"))
    recs = read_log(out)
    assert [r["skipped_nonfinite"] for r in recs] == [0, 1, 1]
    assert np.isnan(recs[1]["loss/test_nan_value"]) and recs[1]["weight/test_nan_value"] == 0.0
    a, b = (load_checkpoint(out / "checkpoints" / f"step_{s:06d}.pt") for s in (1, 2))
    for part in ("student", "losses"):  # the step was not applied: weights and the queue are unchanged
        x, y = (c[part] if part == "student" else c["stages"][0][part] for c in (a, b))
        for k, v in x.items():
            assert torch.equal(v, y[k]), (part, k)


def test_truncated_cache_shard_is_named_before_training(tmp_path):
    from tests.helpers.caches import build_cache
    from tests.helpers.data import make_tiny_dataset

    tsv = make_tiny_dataset(tmp_path / "data", n_images=8)
    cache = build_cache(tsv, tmp_path / "cache")
    target = cache / "shards" / "00000" / "image_tokens.npy"
    target.write_bytes(target.read_bytes()[:-64])
    with pytest.raises(CacheCorruptError, match=r"shards/00000/image_tokens\.npy"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 2))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_refuses_a_corrupt_training_checkpoint(tiny, tmp_path, capsys):
    from distill.pipeline.cli import run_cli
    from distill.pipeline.export import main as export

    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 3, *EXTRA))
    step = out / "checkpoints" / "step_000003.pt"
    state = load_checkpoint(step)
    state["student"][next(iter(state["student"]))].view(-1)[0] += 1.0  # a changed weight, old checksum
    torch.save(state, step)
    capsys.readouterr()
    assert run_cli(export.main, ["--checkpoint", str(step), "--out", str(tmp_path / "exp")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {step} is corrupt: its content does not match its sha256 checksum"
    assert not (tmp_path / "exp").exists()


def test_skip_drops_exactly_the_nonfinite_rows_of_every_field_jpeg_pixels_included():
    from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures
    from distill.pipeline.train.target_check import screen_batch
    from distill.pipeline.train.data import TrainBatch

    n = 4
    parts = [torch.full((k + 2,), k, dtype=torch.uint8) for k in range(n)]  # row k: k+2 bytes of value k
    img = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    tokens = torch.zeros(n, 2, 3)
    tokens[2, 1, 0] = float("inf")  # row 2: an overflowed token
    img[0, 1] = float("nan")  # row 0: a NaN embedding
    teacher = TeacherTargets(ImageFeatures(img, tokens), TextFeatures(torch.ones(n, 3)), logit_scale=1.0)
    batch = TrainBatch(torch.cat(parts), [f"t{k}" for k in range(n)], torch.arange(n), torch.arange(n) * 2,
                       torch.zeros(n, dtype=torch.long), teacher, "jpeg", torch.tensor([len(p) for p in parts]))
    kept, dropped = screen_batch(batch, cache=None, mode="skip")
    assert dropped == 2 and kept.texts == ["t1", "t3"] and kept.image_index.tolist() == [1, 3]
    assert kept.caption_index.tolist() == [2, 6] and torch.equal(kept.teacher.image.embed, img[[1, 3]])
    assert kept.pixel_lengths.tolist() == [3, 5] and torch.equal(kept.pixels, torch.cat([parts[1], parts[3]]))
    same, none = screen_batch(kept, cache=None, mode="error")
    assert same is kept and none == 0
