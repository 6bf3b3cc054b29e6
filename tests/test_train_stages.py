"""The typed training config and its stages (``stages: [{name, steps, losses, balancer}]``): the
config dict round-trips through :class:`TrainRunConfig`, the old keys become stages, a bad stage
entry is one error line, a two-stage run switches losses and balancer at the boundary and resumes
exactly across it, ``train(config)`` returns a :class:`TrainResult`, checkpoints of the previous
layout still load, and the loader hands the step tokenized captions."""
from __future__ import annotations

import json

import pytest
import torch

from distill.core.checkpoint import checksum, load_checkpoint
from distill.core.dist import init_distributed
from distill.core.errors import CheckpointError, ConfigError
from distill.pipeline.cli import run_cli
from distill.pipeline.recipes import pruned_student_recipe
from distill.pipeline.train import loop as tl
from distill.pipeline.train import main as ts
from distill.pipeline.train.config import (DEFAULT_BALANCER, BalancerSpec, LossSpec, StageConfig, TrainRunConfig, resolve_config,
                                           save_config)
from distill.pipeline.train.log import read_log
from tests.helpers.training import assert_same_training_state, die_at, train_args

TWO_STAGES = ("stages=[{name: align, steps: 3, losses: [cosine, feature_l1], balancer: {name: fixed, cfg: {weights: "
              "{cosine: 2}}}}, {losses: [cosine, {name: contrastive_distill, cfg: {queue_size: 8}}, token], "
              "balancer: {name: dynamic}}]")


# ------------------------------------------------------------------------------ typed config
def test_config_dict_round_trips_and_old_keys_become_stages(tmp_path):
    cfg = resolve_config("cpu", overrides=["train.warmup_stage.steps=5", "train.lr=1e-3"])
    config = TrainRunConfig.from_dict(cfg)
    assert config.to_dict() == cfg and config.train.lr == 1e-3 and config.student.options["preset"] == "vit-ti16-128-d6"
    assert config.stages is None  # not configured: made from the old keys
    warm, main = config.effective_stages()
    assert warm == StageConfig(5, [LossSpec("coma_reconstruct")], BalancerSpec("fixed", {"weights": {}}), "warm-up stage")
    assert main.steps is None and [x.name for x in main.losses] == [x["name"] for x in cfg["losses"]]
    assert main.balancer == BalancerSpec.from_dict(DEFAULT_BALANCER)
    assert [s.steps for s in TrainRunConfig().effective_stages()] == [None]  # one stage by default

    staged = resolve_config(overrides=[TWO_STAGES, "losses=[cosine]"])
    first, second = staged["stages"]  # normalised in place: every key, bare loss names expanded
    assert first == {"name": "align", "steps": 3, "losses": [{"name": "cosine", "cfg": {}}, {"name": "feature_l1", "cfg": {}}],
                     "balancer": {"name": "fixed", "cfg": {"weights": {"cosine": 2}}}}
    assert second["steps"] is None and second["balancer"] == {"name": "dynamic", "cfg": {}}
    default = resolve_config(overrides=["stages=[{steps: 2, losses: [token]}, {}]", "losses=[cosine]"])["stages"][1]
    assert default["losses"] == [{"name": "cosine", "cfg": {}}] and default["balancer"]["name"] == "dynamic"
    typed = TrainRunConfig.from_dict(staged)
    assert typed.effective_stages() == typed.stages and typed.to_dict() == staged
    save_config(staged, tmp_path / "c.yaml")  # the saved config resolves to the same config
    assert resolve_config(files=[tmp_path / "c.yaml"]) == staged
    assert TrainRunConfig.from_dict({"train": {"steps": 4}}).train.steps == 4  # a partial dict is a layer


@pytest.mark.parametrize("override,message", [
    ("stages=[{steps: 0, losses: [cosine]}, {}]", r"^stages\[0\]\.steps must be an integer >= 1 .*got 0$"),
    ("stages=[{losses: [cosine]}, {}]", r"^stages\[0\]\.steps must be an integer >= 1 .*got None$"),
    ("stages=[{steps: 2, lossess: [cosine]}, {}]", r"^unknown config key stages\[0\]\.lossess; known: name, steps, "),
    ("stages=[{steps: 2}, 7]", r"^stages\[1\] must be a mapping \{name, steps, losses, balancer\}, got 7$"),
    ("stages=[{steps: 2}, {steps: 4}]", r"^stages\[1\]\.steps must be left out: the last stage runs until train\.steps"),
    ("stages=[{steps: 2, losses: [token, token]}, {}]", r"^stages\[0\]\.losses must have distinct names"),
    ("stages=[{steps: 2, balancer: fixed}, {}]", r"^stages\[0\]\.balancer must be \{name, cfg\}, got 'fixed'$"),
    ("stages=[]", r"^stages must be a non-empty list"),
])
def test_a_bad_stage_entry_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=[override])


def test_bad_stage_is_one_line_before_anything_loads_and_old_and_new_keys_exclude(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--cache", str(tmp_path / "none"), "--data", str(tmp_path / "none.tsv"), "--out", str(out), "--device", "cpu",
            "--set", "stages=[{steps: -1, losses: [cosine]}, {}]"]
    assert run_cli(ts.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: stages[0].steps must be an integer >= 1") and not out.exists()
    with pytest.raises(ConfigError, match="train.warmup_stage and stages exclude each other"):
        resolve_config(overrides=["train.warmup_stage.steps=2", "stages=[{steps: 2}, {}]"])


def test_stages_must_end_before_training_does(tiny, tmp_path):
    tsv, cache = tiny
    with pytest.raises(ConfigError, match=r"stages: the stages before the last take 3 optimizer steps, which must be "
                                          r"fewer than the number of optimizer steps \(3\)"):
        ts.main(train_args(cache, tsv, tmp_path / "run", 3, "--set", TWO_STAGES))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------ staged training
def test_two_stage_run_switches_at_the_boundary(tiny, tmp_path, capsys):
    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 6, "--set", TWO_STAGES, "--set", "train.checkpoint_every=1",
                       "--set", "train.keep_checkpoints=0"))
    assert ("align done after 3 steps (cosine, feature_l1); now training with cosine, contrastive_distill, token"
            in capsys.readouterr().out)
    recs = read_log(out)
    for r in recs[:3]:
        assert r["stage"] == 1 and {k for k in r if k.startswith("loss/")} == {"loss/cosine", "loss/feature_l1"}
        assert (r["weight/cosine"], r["weight/feature_l1"]) == (2.0, 1.0)  # the stage's fixed balancer
        assert r["total"] == pytest.approx(2 * r["loss/cosine"] + r["loss/feature_l1"], rel=1e-6)
    for r in recs[3:]:
        assert r["stage"] == 2 and {k for k in r if k.startswith("loss/")} == {"loss/cosine", "loss/contrastive_distill",
                                                                               "loss/token"}
    ck = {s: load_checkpoint(out / "checkpoints" / f"step_{s:06d}.pt") for s in (3, 6)}
    assert len(ck[6]["stages"]) == 2 and ck[6]["config"]["stages"][0]["name"] == "align"
    balancer = ck[6]["stages"][1]["balancer"]  # the dynamic balancer of stage 2 kept its own statistics
    assert balancer and any(not torch.equal(v, ck[3]["stages"][1]["balancer"][k]) for k, v in balancer.items())
    assert not torch.equal(ck[3]["shared"]["queue"]["ptr"], ck[6]["shared"]["queue"]["ptr"])  # stage 2 queues


def test_resume_across_the_stage_boundary_is_exact(tiny, tmp_path, monkeypatch):
    tsv, cache = tiny
    extra = ("--set", TWO_STAGES, "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=0")
    ts.main(train_args(cache, tsv, tmp_path / "full", 6, *extra))
    die_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        ts.main(train_args(cache, tsv, tmp_path / "cut", 6, *extra))
    monkeypatch.undo()
    # from step 2 (inside the first stage) across the switch after step 3
    ts.main(train_args(cache, tsv, tmp_path / "cut", 6, *extra, "--resume",
                       str(tmp_path / "cut" / "checkpoints" / "step_000002.pt")))
    strip = lambda out: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(out)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "full")
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "latest.pt") for run in ("full", "cut"))
    assert_same_training_state(a, b, queue=True)
    with pytest.raises(CheckpointError, match="holds 2 training stage"):  # resuming it with one stage is refused
        ts.main(train_args(cache, tsv, tmp_path / "cut", 8, "--resume", "auto"))


# ------------------------------------------------------------------------------ the Python API
def test_train_returns_the_typed_result(tiny, tmp_path):
    tsv, cache = tiny
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(cache, tsv, tmp_path / "a", 2)))
    config = TrainRunConfig.from_dict(cfg)
    result = ts.train(config)
    assert isinstance(result, ts.TrainResult) and result.steps == 2 and not result.reused
    assert result.student == tmp_path / "a" / "student" and (result.student / "student.json").is_file()
    assert result.final_total == read_log(tmp_path / "a")[-1]["total"] and result.skipped_nonfinite == 0
    assert json.loads(json.dumps(result.to_dict()))["student"] == str(tmp_path / "a" / "student")
    assert config.train.steps == 2 and config.out == str(tmp_path / "a")  # the caller's config is left alone
    again = ts.train(cfg, resume="auto")  # a config dict works too; here a finished run, reused
    assert again.reused and again.steps == 2 and again.final_total == result.final_total


# ------------------------------------------------------------------------------ checkpoints, loader, recipe
def test_a_checkpoint_of_the_previous_layout_loads_as_stages(tiny, tmp_path):
    tsv, cache = tiny
    ts.main(train_args(cache, tsv, tmp_path / "run", 2, "--set", "train.warmup_stage.steps=1"))
    new = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    warm, main = new["stages"]
    old = {k: v for k, v in new.items() if k not in ("stages", "checksum")}
    old.update(losses=main["losses"], balancer=main["balancer"], warmup_losses=warm["losses"])
    old["checksum"] = checksum(old)
    torch.save(old, tmp_path / "old.pt")
    got = load_checkpoint(tmp_path / "old.pt")
    assert "losses" not in got and len(got["stages"]) == 2 and got["previous_layout"]
    for mine, theirs in zip(got["stages"], new["stages"]):
        assert mine["losses"].keys() == theirs["losses"].keys()
    assert got["stages"][1]["balancer"].keys() == main["balancer"].keys()
    # its optimizer state was saved in the old parameter order (main losses before the warm-up's)
    with pytest.raises(CheckpointError, match="written before training stages with a train.warmup_stage"):
        ts.main(train_args(cache, tsv, tmp_path / "again", 3, "--set", "train.warmup_stage.steps=1",
                           "--resume", str(tmp_path / "old.pt")))
    # one stage: the parameter order is unchanged, the old checkpoint resumes
    ts.main(train_args(cache, tsv, tmp_path / "one", 2))
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    old = {k: v for k, v in one.items() if k not in ("stages", "checksum")}
    old.update(losses=one["stages"][0]["losses"], balancer=one["stages"][0]["balancer"], warmup_losses={})
    old["checksum"] = checksum(old)
    torch.save(old, tmp_path / "old_one.pt")
    ts.main(train_args(cache, tsv, tmp_path / "resumed", 3, "--resume", str(tmp_path / "old_one.pt")))
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == [3]


def test_the_loader_tokenizes_the_captions(tiny, tmp_path):
    tsv, cache = tiny
    cfg = ts.config_from_args(ts.build_parser().parse_args(train_args(cache, tsv, tmp_path / "unused", 2)))
    run = ts.setup(cfg, init_distributed("cpu"))
    _, _, batch = next(tl.epoch_batches(run, 0, 0))
    expected = run.student.tokenize(batch.texts)
    assert set(batch.text) == set(expected)
    for k, v in expected.items():
        assert torch.equal(batch.text[k], v), k
    key = next(iter(expected))
    kept = batch.apply(lambda x: x[torch.tensor([0, 2])])  # rows dropped for non-finite targets keep their tokens
    assert torch.equal(kept.text[key], expected[key][[0, 2]])


def test_pruned_student_recipe_is_a_config_layer():
    layer = pruned_student_recipe("lit:T", image_layers=10, text_layers=3, trainable_image_blocks=4, lr=1e-3,
                                  init_projections=512)
    assert layer == {"student": {"name": "pruned", "teacher": "lit:T", "image_layers": 10, "text_layers": 3,
                                 "frozen_image_layers": 6, "freeze_text_embeddings": True},
                     "train": {"lr": 1e-3, "init_projections": 512}}
    assert pruned_student_recipe("lit:T", 10, trainable_image_blocks=None)["student"]["frozen_image_layers"] == 0
    assert pruned_student_recipe("lit:T", 3, trainable_image_blocks=4)["student"]["frozen_image_layers"] == 0
    config = TrainRunConfig.resolve("cpu", layers=[layer])
    assert config.student.name == "pruned" and "vision_width" not in config.student.options  # the preset's ViT is gone
    assert config.train.lr == 1e-3 and config.train.init_projections == 512 and config.train.batch_size == 64
