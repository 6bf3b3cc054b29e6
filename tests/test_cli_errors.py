"""One-line errors (issue 13.6): every entry point runs through ``distill.pipeline.cli.run_cli``, which prints
the project's errors, bad files and bad arguments as ONE ``error: ...`` line and exits 2, shows the
traceback with ``--debug``, and refuses ``--device cuda`` without a GPU in one line. ``main(argv)``
stays a Python function raising typed errors (train_student's returns its exit status, 0; its
``train_from_argv`` the typed training result)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distill.pipeline.cache import main as cache_teacher
from distill.pipeline import evaluate
from distill.pipeline import quickstart
from distill.pipeline.train import main as ts
from distill.pipeline.cli import NO_GPU, run_cli
from distill.pipeline.export import main as export
from distill.pipeline.lit import train as train_lit
from tests.helpers.paths import REPO
from tests.helpers.training import train_args


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_train_student_main_returns_the_summary_and_the_cli_exit_code_is_0(tiny, tmp_path, capsys):
    tsv, cache = tiny
    summary = ts.train_from_argv(train_args(cache, tsv, tmp_path / "a", 2))
    assert isinstance(summary, ts.TrainResult) and summary.steps == 2
    assert ts.main(train_args(cache, tsv, tmp_path / "c", 2)) == 0
    assert run_cli(ts.main, train_args(cache, tsv, tmp_path / "b", 2)) == 0


@pytest.mark.parametrize("main,argv,expected", [
    (ts.main, ["--cache", "{tmp}/nocache", "--data", "x.tsv", "--device", "cpu"],
     "error: {tmp}/nocache/manifest.json not found: not a teacher cache"),
    (ts.main, ["--cache", "c", "--data", "d", "--bogus"], "error: unrecognized arguments: --bogus"),
    (ts.main, ["--cache", "c", "--data", "d", "--config", "{tmp}/none.yaml"], "error: config file not found: {tmp}/none.yaml"),
    (ts.main, ["--cache", "c", "--data", "d", "--set", "train.nope=1"], "error: unknown config key train.nope"),
    (ts.main, ["--cache", "c", "--data", "d", "--plugin", "no_such_plugin_mod"], "error: --plugin no_such_plugin_mod: no such module"),
    (evaluate.main, ["--model", "{tmp}/missing"], "error: --model '{tmp}/missing' is neither an existing"),
    (evaluate.main, ["--model", "nope:1", "--data", "x"], "error: --model 'nope:1' is neither"),
    (cache_teacher.main, ["--teacher", "nope:0", "--data", "{tmp}", "--out", "{tmp}/c", "--device", "cpu"],
     "error: unknown teacher 'nope'; known:"),
    (cache_teacher.main, ["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", "{tmp}/none.tsv",
                          "--out", "{tmp}/c", "--device", "cpu"], "error: dataset not found: {tmp}/none.tsv"),
    (export.main, ["--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/e"], "error: no student folder or checkpoint at {tmp}/none.pt"),
    (train_lit.main, ["--out", "{tmp}/t"], "error: the following arguments are required: --data"),
    (quickstart.main, ["--steps", "x"], "error: argument --steps: invalid int value: 'x'"),
])
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, main, argv, expected):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run_cli(main, argv) == 2
    assert _one_line(capsys).startswith(expected.format(tmp=tmp_path))


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert run_cli(ts.main, ["--cache", str(tmp_path), "--data", "x", "--device", "cpu", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ManifestError" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: {tmp_path}/manifest.json not found")


def test_run_folder_refusal_and_nonfinite_targets_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    from tests.helpers.training import poison_targets

    tsv, cache = tiny
    out = tmp_path / "run"
    ts.main(train_args(cache, tsv, out, 2))
    capsys.readouterr()
    assert run_cli(ts.main, train_args(cache, tsv, out, 2)) == 2
    assert _one_line(capsys) == (f"error: {out} already holds a training run (checkpoints, student, plots, tb, "
                                 "train_log.jsonl, config.yaml); pass --resume auto to continue it or --overwrite "
                                 "to replace it")
    poison_targets(monkeypatch)
    assert run_cli(ts.main, train_args(cache, tsv, out, 4, "--overwrite")) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"teacher cache {cache}: non-finite (NaN/Inf) teacher targets" in line[0]
    assert "shards/00000: image_embed" in line[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("main,argv", [
    (ts.main, ["--cache", "c", "--data", "d", "--device", "cuda"]),
    (evaluate.main, ["--model", "toy:0", "--device", "cuda:0"]),
    (cache_teacher.main, ["--teacher", "toy:0", "--data", "d", "--out", "o", "--device=cuda"]),
    (train_lit.main, ["--data", "d", "--out", "o", "--device", "cuda"]),
])
def test_cuda_without_a_gpu_is_one_line(capsys, main, argv):
    assert run_cli(main, argv) == 2
    assert _one_line(capsys).endswith(NO_GPU)


def test_cuda_from_a_config_file_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cuda\n")
    assert run_cli(ts.main, ["--cache", "c", "--data", "d", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert _one_line(capsys) == f"error: device cuda: {NO_GPU}"


@pytest.mark.slow
@pytest.mark.parametrize("module,argv,expected", [
    ("distill.train_student", ["--cache", "{tmp}/nocache", "--data", "x", "--device", "cpu"], "manifest.json not found"),
    ("distill.train_student", ["--steps", "-5", "--cache", "c", "--data", "d", "--device", "cpu"], "train.steps (--steps)"),
    ("distill.cache_teacher", ["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", "{tmp}/x.tsv",
                               "--out", "{tmp}/c", "--verify", "-3"], "--verify must be"),
    ("distill.evaluate", ["--model", "{tmp}/missing"], "is neither an existing"),
    ("distill.export", ["--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/e"], "no student folder or checkpoint"),
    ("distill.train_lit", ["--data", "{tmp}/none", "--out", "{tmp}/t", "--device", "cpu"], "dataset not found"),
    ("distill.quickstart", ["--steps", "0x"], "argument --steps: invalid int value"),
])
def test_command_line_errors_are_one_line_with_exit_2(tmp_path, module, argv, expected):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *[a.format(tmp=tmp_path) for a in argv]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:") or "Traceback" in x]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
