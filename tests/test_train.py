"""``python -m distill.train_student``: a short run, data/teacher alignment after shuffling, the
non-finite guard, checkpoint safety, config parsing and the dataset-fingerprint check.

Most tests train a tiny ``vit`` student (width 32, 2 blocks, 32 px / patch 8, 1 text layer, context 16)
with batch 4 for a few steps on the toy-teacher cache of a tiny TSV (the ``tiny`` fixture).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.pipeline.train import loop as tl
from distill.pipeline.train import main as ts
from distill.core.data.augment import apply_view
from distill.core.cache.reader import TeacherCache
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import CheckpointError, ConfigError, DatasetMismatchError
from distill.pipeline.train.config import (DEFAULT_BALANCER, DEFAULT_LOSSES, MULTISCALE_LOSSES, load_config_file,
                                           parse_override, resolve_config)
from distill.core.data.factory import load_dataset
from distill.core.dist import init_distributed
from distill.losses import LOSSES, DistillBatch, DistillLoss, Dims
from distill.pipeline.train.data import GlobalBatchSampler
from distill.pipeline.train.log import read_log
from teachers import create_teacher
from tests.helpers.data import make_tiny_dataset
from tests.helpers.registry import registered
from tests.helpers.training import TINY_STUDENT, train_args


# ------------------------------------------------------------------------------------ short run
def test_short_run_learns_and_writes_outputs(tiny, tmp_path):
    tsv, cache = tiny
    out = tmp_path / "run"
    # loss-value references: the total is then comparable across steps (with gradient-norm
    # references, the default, it is a sum of gradient-normalised terms whose references still move)
    summary = ts.train_from_argv(train_args(cache, tsv, out, 15, "--set", "balancer.cfg.scale=value"))
    recs = read_log(out)
    assert [r["step"] for r in recs] == list(range(1, 16))
    first = np.mean([r["total"] for r in recs[:3]])
    last = np.mean([r["total"] for r in recs[-3:]])
    assert last < 0.9 * first, (first, last)
    for r in recs:
        assert {f"loss/{n}" for n in DEFAULT_LOSSES} <= set(r) and {f"weight/{n}" for n in DEFAULT_LOSSES} <= set(r)
        assert r["skipped_nonfinite"] == 0 and r["samples_per_s"] > 0 and np.isfinite(r["total"])
    assert recs[0]["lr"] == pytest.approx(0.5e-3) and recs[1]["lr"] == pytest.approx(1e-3)  # linear warmup over 2 steps
    assert recs[-1]["lr"] < recs[2]["lr"]  # cosine decay
    assert [r["epoch"] for r in recs[:4]] == [0, 0, 0, 1]  # 12 images / batch 4 = 3 batches per epoch
    assert summary.steps == 15 and summary.final_total == recs[-1]["total"]

    assert (out / "plots" / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest.pt", "step_000008.pt", "step_000012.pt", "step_000015.pt"]  # keep_checkpoints=3
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 15 and ckpt["sampler"] == {"epoch": 4, "position": 3}

    cfg = load_config_file(out / "config.yaml")
    assert cfg["student"] == {"name": "vit", **TINY_STUDENT} and cfg["train"]["steps"] == 15
    assert [item["name"] for item in cfg["losses"]] == DEFAULT_LOSSES and cfg["balancer"]["name"] == "dynamic"

    from students import load_student

    student = load_student(out / "student")
    for k, v in student.state_dict().items():
        assert torch.equal(v, ckpt["student"][k]), k


def test_periodic_eval_is_logged(tiny, tmp_path, monkeypatch):
    tsv, cache = tiny
    calls: list[int] = []
    try:
        import distill.pipeline.evaluate  # noqa: F401
    except ImportError:  # stand-in until distill/evaluate.py lands
        stub = types.ModuleType("distill.pipeline.evaluate")
        stub.evaluate_model = lambda model, ds, batch_size, device: {"i2t_R@1": 1.0, "rsum": 6.0}
        monkeypatch.setitem(sys.modules, "distill.pipeline.evaluate", stub)
    real = sys.modules["distill.pipeline.evaluate"].evaluate_model

    def spy(model, ds, batch_size, device):
        calls.append(ds.num_images)
        assert not model.training
        return real(model, ds, batch_size, device)

    monkeypatch.setattr(sys.modules["distill.pipeline.evaluate"], "evaluate_model", spy)
    out = tmp_path / "run"
    summary = ts.train_from_argv(train_args(cache, tsv, out, 4, "--set", f"eval.data={tsv}", "--set", "eval.split=all",
                                 "--set", "eval.every=2", "--set", "eval.batch_size=8"))
    evals = read_log(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and calls == [12, 12]
    assert "eval/rsum" in evals[-1] and summary.eval["rsum"] == evals[-1]["eval/rsum"]


# ------------------------------------------------------------------------------ data alignment
def _setup(cache: Path, tsv: Path, seed: int, workers: int = 0) -> ts.Run:
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(cache, tsv, Path("unused"), 6)))
    cfg["seed"], cfg["data"]["num_workers"] = seed, workers
    return ts.setup(cfg, init_distributed("cpu"))


def test_shuffled_batches_stay_aligned_with_teacher_views(tiny):
    tsv, cache_dir = tiny
    cache, ds = TeacherCache(cache_dir), load_dataset(tsv)
    teacher = create_teacher("toy:0")
    run = _setup(cache_dir, tsv, seed=3, workers=1)
    transform = run.student.image_transform()
    orders, captions, views = [], [], []
    for epoch, position, batch in _take(tl.epoch_batches(run, 0, 0), 6):  # two epochs
        ids, caps, vs = batch.image_index.numpy(), batch.caption_index.numpy(), batch.view.numpy()
        orders.append(ids)
        captions.append(caps)
        views.append(vs)
        assert np.all((cache.offsets[ids] <= caps) & (caps < cache.offsets[ids + 1]))
        assert batch.texts == [ds.captions[c] for c in caps]
        for row, (i, c, v) in enumerate(zip(ids, caps, vs)):
            # the teacher outputs are those of exactly this image view and caption ...
            # (the loader hands over fp16 as stored; TrainBatch.to converts on the device)
            torch.testing.assert_close(batch.teacher.image.embed[row].float(), cache.images([i], int(v)).embed[0])
            torch.testing.assert_close(batch.teacher.image.tokens[row].float(), cache.images([i], int(v)).tokens[0])
            torch.testing.assert_close(batch.teacher.text.embed[row].float(), cache.texts([c]).embed[0])
            # ... and the student sees the same crop the teacher saw
            view_img = apply_view(ds.load_image(int(i)), cache.view_params([i], int(v))[0])
            torch.testing.assert_close(batch.pixels[row], transform(view_img))
            with torch.no_grad():
                fresh = teacher.encode_image(teacher.image_transform()(view_img)[None]).embed[0]
            torch.testing.assert_close(batch.teacher.image.embed[row].float(), fresh, atol=2e-3, rtol=0)
    epoch0, epoch1 = np.concatenate(orders[:3]), np.concatenate(orders[3:])
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert not np.array_equal(epoch0, np.arange(12)) and not np.array_equal(epoch0, epoch1)
    assert set(np.concatenate(views)) == {0, 1}
    by_image = lambda k: dict(zip(np.concatenate(orders[3 * k:3 * k + 3]), np.concatenate(captions[3 * k:3 * k + 3])))  # noqa: E731
    assert by_image(0) != by_image(1)  # captions are re-drawn every epoch

    other = _setup(cache_dir, tsv, seed=4)
    other_order = np.concatenate([b.image_index.numpy() for _, _, b in _take(tl.epoch_batches(other, 0, 0), 3)])
    assert not np.array_equal(other_order, epoch0)


def _take(it, n):
    for _ in range(n):
        yield next(it)


def test_rank_shards_union_is_the_single_process_batch():
    single = list(GlobalBatchSampler(20, 8, seed=1))
    ranks = [list(GlobalBatchSampler(20, 8, seed=1, rank=r, world=2)) for r in range(2)]
    assert len(single) == 2 and all(len(b) == 4 for r in ranks for b in r)
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert r0 + r1 == single[b]
    resumed = GlobalBatchSampler(20, 8, seed=1)
    resumed.set_epoch(0, start=1)
    assert list(resumed) == single[1:]
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        GlobalBatchSampler(20, 8, seed=1, world=3)


# ------------------------------------------------------------------------------ non-finite guard
class NanGradLoss(DistillLoss):
    """Test-only loss: value 1; at ``bad_steps`` it turns the gradient of the student's image
    embedding into NaN (a stand-in for an fp overflow deep in the network)."""

    def __init__(self, dims: Dims, bad_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bad_steps = tuple(bad_steps)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        x = batch.s_img.embed
        if batch.step in self.bad_steps and x.requires_grad:
            x.register_hook(lambda g: torch.full_like(g, float("nan")))
        return (x * 0.0).sum() + 1.0


@pytest.fixture
def nan_grad_loss():
    with registered(LOSSES, "test_nan_grad", NanGradLoss):
        yield


def test_nonfinite_gradient_skips_the_update(tiny, tmp_path, nan_grad_loss):
    tsv, cache = tiny
    out = tmp_path / "run"
    losses = "[{name: contrastive_distill, cfg: {queue_size: 16}}, {name: feature_l1}, {name: test_nan_grad, cfg: {bad_steps: [2]}}]"
    # loss-value references: with scale=grad the balancer itself drops a term whose gradient norm is
    # not finite (weight 0), and this test is about the trainer's skip
    ts.main(train_args(cache, tsv, out, 5, "--set", f"losses={losses}", "--set", "train.checkpoint_every=1",
                       "--set", "train.keep_checkpoints=0", "--set", "balancer.cfg.scale=value"))
    recs = read_log(out)
    assert [r["skipped_nonfinite"] for r in recs] == [0, 0, 1, 1, 1]
    assert all(np.isfinite(r["total"]) for r in recs)
    ck = {s: load_checkpoint(out / "checkpoints" / f"step_{s:06d}.pt") for s in (2, 3, 4)}
    for k, v in ck[2]["student"].items():  # step 3 (index 2) was skipped: nothing changed ...
        assert torch.equal(v, ck[3]["student"][k]), k
        assert torch.isfinite(ck[4]["student"][k]).all()
    for k, v in ck[2]["shared"]["queue"].items():  # ... not even the shared teacher queue
        assert torch.equal(v, ck[3]["shared"]["queue"][k]), k
    assert not torch.equal(ck[3]["shared"]["queue"]["ptr"], ck[4]["shared"]["queue"]["ptr"])
    changed = [k for k, v in ck[3]["student"].items() if not torch.equal(v, ck[4]["student"][k])]
    assert changed  # training continued after the skipped step
    assert ck[3]["scheduler"]["last_epoch"] == 3


# ------------------------------------------------------------------------------ checkpoint safety
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickled_checkpoint_is_refused(tiny, tmp_path):
    tsv, cache = tiny
    marker = tmp_path / "executed.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "student": {}, "student_config": {}, "losses": {}, "balancer": {}, "optimizer": {},
                "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refusing"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 2, "--resume", str(evil)))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a training checkpoint: missing"):
        torch.save({"step": 1}, tmp_path / "plain.pt")
        load_checkpoint(tmp_path / "plain.pt")


# ------------------------------------------------------------------------------ config
def test_config_overrides_and_presets(tmp_path):
    assert parse_override("train.lr=1e-3") == {"train": {"lr": 1e-3}}
    assert parse_override("train.betas=[0.9, 0.95]") == {"train": {"betas": [0.9, 0.95]}}
    assert parse_override("data.use_views=false") == {"data": {"use_views": False}}
    assert parse_override("eval.data=null") == {"eval": {"data": None}}
    assert parse_override("student.teacher=lit:/x/y") == {"student": {"teacher": "lit:/x/y"}}
    assert parse_override("a.b.c=7") == {"a": {"b": {"c": 7}}}
    for bad in ("train.lr", "=3", "train..lr=1"):
        with pytest.raises(ConfigError, match="key.sub=value"):
            parse_override(bad)

    cpu = resolve_config("cpu")
    assert cpu["student"] == {"name": "vit", "preset": "vit-ti16-128-d6"}
    assert cpu["train"]["batch_size"] == 64 and [x["name"] for x in cpu["losses"]] == DEFAULT_LOSSES
    assert cpu["balancer"] == DEFAULT_BALANCER == {"name": "dynamic", "cfg": {"scale": "grad", "ref_after": 200}}
    # another balancer takes other options: a layer naming one replaces the section, not merges into it
    assert resolve_config("cpu", overrides=["balancer.name=fixed"])["balancer"] == {"name": "fixed", "cfg": {}}
    assert resolve_config("cpu", layers=[{"balancer": {"name": "dynamic", "cfg": {"scale": "value"}}}])["balancer"] \
        == {"name": "dynamic", "cfg": {"scale": "value", "ref_after": 200}}
    paper = resolve_config("multiscale")  # the paper's seven terms, loss-value references
    assert [x["name"] for x in paper["losses"]] == MULTISCALE_LOSSES
    assert paper["balancer"] == {"name": "dynamic", "cfg": {"scale": "value", "ref_after": 0}}
    gpu = resolve_config("gpu", overrides=["train.batch_size=128", "student.vision_layers=8"])
    assert gpu["student"] == {"name": "vit", "preset": "vit-s16-t384", "vision_layers": 8}
    assert gpu["train"]["precision"] == "bf16" and gpu["train"]["batch_size"] == 128

    pruned = resolve_config("cpu", flags={"student.name": "pruned"},
                            overrides=["student.teacher=lit:DIR", "student.image_layers=10", "student.text_layers=2"])
    assert pruned["student"] == {"name": "pruned", "teacher": "lit:DIR", "image_layers": 10, "text_layers": 2}
    with pytest.raises(ConfigError, match="^student.text_layers: required option of student 'pruned' is not given$"):
        resolve_config("cpu", flags={"student.name": "pruned"}, overrides=["student.teacher=lit:DIR", "student.image_layers=10"])

    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 2.0e-4\n  steps: 7\nlosses: [cosine, {name: token, cfg: {text_match: attention}}]\n"
                   "balancer: {name: fixed, cfg: {weights: {cosine: 2}}}\n")
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"train": {"steps": 9}}))
    cfg = resolve_config("cpu", [yml, js], {"train.lr": None, "seed": 5}, ["train.accum_steps=2"])
    assert cfg["train"]["lr"] == 2e-4 and cfg["train"]["steps"] == 9 and cfg["seed"] == 5 and cfg["train"]["accum_steps"] == 2
    assert cfg["losses"] == [{"name": "cosine", "cfg": {}}, {"name": "token", "cfg": {"text_match": "attention"}}]
    assert cfg["balancer"] == {"name": "fixed", "cfg": {"weights": {"cosine": 2}}}

    with pytest.raises(ConfigError, match="unknown config key train.lrr"):
        resolve_config(overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_config(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="distinct names"):
        resolve_config(overrides=["losses=[cosine, cosine]"])
    for bad in ("-1", "0.5", "true"):
        with pytest.raises(ConfigError, match="train.init_projections"):
            resolve_config(overrides=[f"train.init_projections={bad}"])
    assert resolve_config(overrides=["train.init_projections=64"])["train"]["init_projections"] == 64

    args = ts.build_parser().parse_args(["--preset", "cpu", "--epochs", "2", "--batch-size", "8", "--set", "train.steps=100"])
    cfg = ts.config_from_args(args)
    assert cfg["train"]["steps"] == 100 and cfg["train"]["epochs"] == 2 and cfg["train"]["batch_size"] == 8
    cfg = ts.config_from_args(ts.build_parser().parse_args(["--config", str(yml), "--epochs", "3"]))
    assert cfg["train"]["steps"] is None and cfg["train"]["epochs"] == 3  # --epochs replaces the file's steps
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


# ------------------------------------------------------------------------------ dataset mismatch
def test_cache_of_another_dataset_is_rejected(tiny, tmp_path):
    _, cache = tiny
    other = make_tiny_dataset(tmp_path / "other", n_images=12, seed=7)
    with pytest.raises(DatasetMismatchError, match=r"was not built from --data .*other.*Rebuild the cache"):
        ts.main(train_args(cache, other, tmp_path / "run", 2))
    assert not (tmp_path / "run" / "checkpoints").exists()
