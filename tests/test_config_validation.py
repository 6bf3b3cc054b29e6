"""Every numeric setting is checked when the config / command line is parsed, with one error line
naming the key or flag (issue 13.2): nothing is loaded, cached or trained before the check."""
from __future__ import annotations

from pathlib import Path

import pytest

from distill.pipeline.cache import main as cache_teacher
from distill.pipeline import evaluate
from distill.pipeline.train import main as ts
from distill.pipeline.cli import run_cli
from distill.pipeline.train.config import SETTINGS, load_config_file, resolve_config
from distill.core.errors import ConfigError


@pytest.mark.parametrize("override,message", [
    ("train.grad_clip=-1", r"^train\.grad_clip must be a number >= 0 \(0 disables clipping\), got -1$"),
    ("train.checkpoint_every=0", r"^train\.checkpoint_every must be an integer >= 1, got 0$"),
    ("train.log_every=0", r"^train\.log_every must be an integer >= 1, got 0$"),
    ("train.steps=0", r"^train\.steps \(--steps\) must be an integer >= 1 .*got 0$"),
    ("train.steps=-5", r"^train\.steps \(--steps\) must be an integer >= 1 .*got -5$"),
    ("train.steps=2.5", r"^train\.steps \(--steps\) must be an integer >= 1 .*got 2\.5$"),
    ("train.epochs=-1", r"^train\.epochs \(--epochs\) must be a number > 0, got -1$"),
    ("train.epochs=0", r"^train\.epochs \(--epochs\) must be a number > 0, got 0$"),
    ("train.lr=abc", r"^train\.lr \(--lr\) must be a number > 0, got 'abc'$"),
    ("train.lr=0", r"^train\.lr \(--lr\) must be a number > 0, got 0$"),
    ("train.lr=.nan", r"^train\.lr \(--lr\) must be a number > 0, got nan$"),
    ("train.warmup_steps=-1", r"^train\.warmup_steps must be a step count >= 0 or a fraction of train\.steps in \[0, 1\), got -1$"),
    ("train.warmup_steps=ten", r"^train\.warmup_steps must be a step count >= 0 .*got 'ten'$"),
    ("train.warmup_steps=1.5", r"^train\.warmup_steps must be a step count >= 0 .*got 1\.5$"),
    ("train.min_lr_ratio=1.5", r"^train\.min_lr_ratio must be a number in \[0, 1\], got 1\.5$"),
    ("train.weight_decay=-0.1", r"^train\.weight_decay must be a number >= 0, got -0\.1$"),
    ("train.betas=[0.9,1.0]", r"^train\.betas must be two numbers in \[0, 1\).*got \[0\.9, 1\.0\]$"),
    ("train.betas=[-0.1,0.9]", r"^train\.betas must be two numbers in \[0, 1\)"),
    ("train.betas=[0.9]", r"^train\.betas must be two numbers in \[0, 1\)"),
    ("train.eps=0", r"^train\.eps must be a number > 0, got 0$"),
    ("train.batch_size=0", r"^train\.batch_size \(--batch-size\) must be an integer >= 1, got 0$"),
    ("train.accum_steps=true", r"^train\.accum_steps must be an integer >= 1, got True$"),
    ("train.keep_checkpoints=-1", r"^train\.keep_checkpoints must be an integer >= 0"),
    ("train.init_projections=-2", r"^train\.init_projections must be a number of samples >= 0, got -2$"),
    ("train.deterministic=maybe", r"^train\.deterministic must be true or false, got 'maybe'$"),
    ("eval.every=-1", r"^eval\.every must be an integer >= 0 .*got -1$"),
    ("eval.batch_size=0", r"^eval\.batch_size must be an integer >= 1, got 0$"),
    ("data.num_workers=-1", r"^data\.num_workers \(--num-workers\) must be an integer >= 0, got -1$"),
    ("data.on_nonfinite=ignore", r"^data\.on_nonfinite must be error or skip, got 'ignore'$"),
    ("seed=-3", r"^seed \(--seed\) must be an integer >= 0, got -3$"),
])
def test_bad_value_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=[override])


def test_every_setting_has_a_rule_and_the_defaults_pass():
    cfg = resolve_config()
    assert cfg["train"]["steps"] is None and cfg["data"]["on_nonfinite"] == "error"
    checked = {r.key for r in SETTINGS}
    numeric = {f"{s}.{k}" for s in ("data", "train", "eval") for k, v in cfg[s].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= checked, numeric - checked


def test_numeric_strings_and_integral_floats_are_coerced(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: '0'\n  steps: 1.0e+3\n")  # YAML 1.1 reads 1e-3 as a string
    assert load_config_file(path)["train"]["lr"] == "1e-3"
    cfg = resolve_config(files=[path])
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["weight_decay"] == 0.0
    assert cfg["train"]["steps"] == 1000 and isinstance(cfg["train"]["steps"], int)


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv,line", [
    (["--steps", "0"], "error: train.steps (--steps) must be an integer >= 1"),
    (["--steps", "-5"], "error: train.steps (--steps) must be an integer >= 1"),
    (["--epochs", "-1"], "error: train.epochs (--epochs) must be a number > 0, got -1.0"),
    (["--lr", "0"], "error: train.lr (--lr) must be a number > 0, got 0.0"),
    (["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
    (["--set", "train.grad_clip=-1"], "error: train.grad_clip must be a number >= 0"),
    (["--set", "train.checkpoint_every=0"], "error: train.checkpoint_every must be an integer >= 1, got 0"),
])
def test_train_student_flags_fail_before_anything_is_loaded(tmp_path, capsys, argv, line):
    out = tmp_path / "run"
    args = ["--cache", str(tmp_path / "no_cache"), "--data", str(tmp_path / "no.tsv"), "--out", str(out),
            "--device", "cpu", *argv]
    assert run_cli(ts.main, args) == 2
    assert _one_line(capsys).startswith(line)
    assert not out.exists()


def test_evaluate_max_captions_zero_is_refused(tmp_path, capsys):
    assert run_cli(evaluate.main, ["--model", "toy:0", "--data", str(tmp_path / "x.tsv"), "--max-captions", "0"]) == 2
    assert _one_line(capsys) == "error: --max-captions must be an integer >= 1, got 0"
    assert run_cli(evaluate.main, ["--model", "toy:0", "--batch-size", "0"]) == 2
    assert _one_line(capsys) == "error: --batch-size must be an integer >= 1, got 0"


@pytest.mark.parametrize("argv,line", [
    (["--verify", "-3"], "error: --verify must be a number of samples >= 0 (0: no check), got -3"),
    (["--view-scale", "0,0"], "error: --view-scale must be min,max with 0 < min <= max <= 1, got '0,0'"),
    (["--view-scale", "0.9,0.1"], "error: --view-scale must be min,max with 0 < min <= max <= 1, got '0.9,0.1'"),
    (["--view-scale", "0.5,1.5"], "error: --view-scale must be min,max with 0 < min <= max <= 1, got '0.5,1.5'"),
    (["--view-scale", "half"], "error: --view-scale must be two numbers min,max, got 'half'"),
    (["--views", "0"], "error: --views must be an integer >= 1, got 0"),
    (["--shard-size", "-1"], "error: --shard-size must be an integer >= 1, got -1"),
])
def test_cache_teacher_flags_fail_before_the_cache_is_written(tmp_path, capsys, argv, line):
    out = tmp_path / "cache"
    args = ["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tmp_path / "x.tsv"),
            "--out", str(out), "--device", "cpu", *argv]
    assert run_cli(cache_teacher.main, args) == 2
    assert _one_line(capsys) == line
    assert not out.exists()
