"""New-user rough edges (issue 14): warm-up as a fraction of the run, intermediate layers / token
grids the teacher does not have, a batch larger than the data and ``--preset gpu`` on CPU,
validation on the console and in losses.png, rerunning a finished run, the init_projections
sample count, the caching bars and the quickstart's throughput timing."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.axes
import pytest

from distill.pipeline.train import main as ts
from distill.pipeline.cache.main import main as cache_main
from distill.pipeline.train.config import DEFAULTS, resolve_config
from distill.pipeline.train.optim import warmup_steps
from distill.core.errors import ConfigError
from distill.pipeline.train.log import read_log
from tests.helpers.caches import build_cache
from tests.helpers.data import make_tiny_dataset
from tests.helpers.teachers import tiny_openclip_spec
from tests.helpers.training import train_args


def test_warmup_default_is_five_percent_of_the_run():
    assert DEFAULTS["train"]["warmup_steps"] == 0.05
    assert [warmup_steps(0.05, n) for n in (4, 30, 60, 1000)] == [1, 2, 3, 50]
    assert warmup_steps(0.0, 100) == 0 and warmup_steps(7, 100) == 7
    assert resolve_config(overrides=["train.warmup_steps=0.1"])["train"]["warmup_steps"] == 0.1
    for bad in ("1.5", "-1", "x", "true"):
        with pytest.raises(ConfigError, match=r"train\.warmup_steps must be a step count >= 0 or a fraction"):
            resolve_config(overrides=[f"train.warmup_steps={bad}"])


def test_layers_and_grid_beyond_the_teacher(tmp_path: Path):
    tsv = make_tiny_dataset(tmp_path / "data", n_images=2, caps_per_image=1)
    spec = tiny_openclip_spec(tmp_path)  # 2 image blocks, 2 text layers, 4x4 token grid
    base = ["--teacher", spec, "--data", str(tsv), "--out", str(tmp_path / "c"), "--num-workers", "0", "--device", "cpu"]
    with pytest.raises(ConfigError, match=r"--layers text\.2: the teacher's text tower has 2 layers "
                                          r"\(valid: text\.0 \.\. text\.1\)"):
        cache_main([*base, "--layers", "image.1,text.2"])
    with pytest.raises(ConfigError, match=r"--image-tokens grid:5 is larger than the teacher's 4x4 token grid.*g <= 4"):
        cache_main([*base, "--image-tokens", "grid:5"])
    assert not (tmp_path / "c").exists()
    cache_main([*base, "--layers", "image.1,text.1", "--image-tokens", "grid:2"])


@pytest.mark.slow
def test_lit_text_layer_six_of_minilm(tmp_path: Path):
    from teachers.lit import LiTConfig, LiTTeacher

    LiTTeacher(LiTConfig(image_size=64, embed_dim=32, seed=3)).save(tmp_path / "lit")
    tsv = make_tiny_dataset(tmp_path / "data", n_images=2, caps_per_image=1)
    with pytest.raises(ConfigError, match=r"--layers text\.6: the teacher's text tower has 6 layers "
                                          r"\(valid: text\.0 \.\. text\.5\)"):
        cache_main(["--teacher", f"lit:{tmp_path / 'lit'}", "--data", str(tsv), "--out", str(tmp_path / "c"),
                    "--num-workers", "0", "--device", "cpu", "--layers", "text.6"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("usability")
    tsv = make_tiny_dataset(root / "data")
    return tsv, build_cache(tsv, root / "cache")


def test_caching_has_a_caption_bar(tmp_path: Path, capsys):
    tsv = make_tiny_dataset(tmp_path / "data", n_images=3, caps_per_image=2)
    build_cache(tsv, tmp_path / "cache")
    err = capsys.readouterr().err
    assert "caching: 100%" in err and "3/3" in err and "captions: 100%" in err and "6/6" in err


def test_batch_larger_than_the_data_and_gpu_preset_on_cpu(tiny, tmp_path: Path, capsys):
    tsv, cache = tiny
    with pytest.raises(ConfigError, match=r"train\.batch_size 16 is larger than the 12 training images; pass "
                                          r"--batch-size 12 or less \(--preset gpu's batch of 256 is meant for GPUs"):
        ts.main([*train_args(cache, tsv, tmp_path / "a", 2), "--batch-size", "16"])
    with pytest.raises(ConfigError, match="larger than the 12 training images"):
        ts.main(["--preset", "gpu", "--cache", str(cache), "--data", str(tsv), "--out", str(tmp_path / "b"),
                 "--device", "cpu", "--set", "student.vision_layers=1", "--set", "student.text_layers=1"])
    assert "warning: --preset gpu is meant for a CUDA GPU" in capsys.readouterr().err


def test_validation_console_plot_rerun_and_init_projections(tiny, tmp_path: Path, capsys, monkeypatch):
    tsv, cache = tiny
    labels: list[str] = []
    plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    argv = [*train_args(cache, tsv, tmp_path / "run", 4, "--resume", "auto"), "--set", f"eval.data={tsv}",
            "--set", "eval.split=all", "--set", "eval.every=2", "--set", "train.init_projections=100",
            "--set", "student.embed_dim=16"]  # the toy teacher's width
    ts.main(argv)
    out = capsys.readouterr().out
    evals = read_log(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        total = next(t["total"] for t in read_log(tmp_path / "run") if t["step"] == r["step"])
        assert (f"eval step {r['step']}: rsum {r['eval/rsum']:.2f} (i2t R@1 {r['eval/i2t_R@1']:.2f}, "
                f"t2i R@1 {r['eval/t2i_R@1']:.2f}), total loss {total:.4f}") in out
    assert "projection heads fitted to the teacher on 12 samples" in out
    assert "asked for 100, but one pass over the training batches holds only 12" in out
    assert "total (weighted)" in labels and "validation RSUM" in labels
    assert (tmp_path / "run" / "plots" / "losses.png").is_file()

    final = read_log(tmp_path / "run")[-1]["total"]
    ts.main(argv)  # the same command again: the finished run is reused, and says so
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} already holds a finished run of 4 steps" in out and "reused it without training" in out
    assert f"final total loss {final:.4f}" in out and "n/a" not in out


def test_quickstart_throughput_is_a_median(monkeypatch):
    from distill.pipeline import quickstart

    timings = iter([10.0, 400.0, 30.0, 20.0, 300.0])
    monkeypatch.setattr(quickstart, "images_per_second", lambda *a, **k: next(timings))
    assert quickstart.throughput(object(), 32, "cpu") == 30.0


def test_quickstart_default_data_is_the_bundled_sample():
    from distill.pipeline import quickstart

    assert (quickstart.SAMPLE / "captions.tsv").is_file(), quickstart.SAMPLE


@pytest.mark.slow
def test_quickstart_runs_end_to_end_through_the_python_apis(tmp_path, capsys):
    """The README's first command, shortened (2 teacher epochs, 4 student steps): train_lit ->
    run_cache -> train -> evaluate on the bundled sample, through the shim entry point's main."""
    from distill.pipeline.cli import run_cli
    from distill.quickstart import main

    out = tmp_path / "qs"
    assert run_cli(main, ["--out", str(out), "--teacher-epochs", "2", "--steps", "4", "--workers", "0"]) == 0
    rows = json.loads((out / "quickstart.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student"]
    assert all(0 < r["rsum"] <= 600 for r in rows)
    assert (out / "teacher" / "lit.json").is_file() and (out / "cache" / "manifest.json").is_file()
    assert "Retrieval on flickr8k test (100 images, 500 captions)" in capsys.readouterr().out
