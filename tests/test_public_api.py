"""The public Python API (``import distill``), the README's Python block run on a tiny dataset, and
the ``mmdistill`` console script (issue 19.1)."""
from __future__ import annotations

import configparser
import importlib
import re

import pytest

import distill
from distill.core.registry import BALANCERS, DATASET_FORMATS, LOSSES, STUDENTS, TEACHERS
from distill.pipeline import commands
from tests.helpers.data import make_tiny_flickr8k
from tests.helpers.paths import REPO
from tests.helpers.training import TINY_STUDENT


def readme_python_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- PYTHON-API -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- PYTHON-API --> python block"
    return block.group(1)


def test_the_readme_python_block_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    """The block as written, with three substitutions: the tiny dataset for the sample, the toy
    teacher for ViT-B-32 (no download), and a last config layer making the run tiny."""
    code = readme_python_block()
    assert len(code.strip().splitlines()) <= 10
    data = make_tiny_flickr8k(tmp_path / "data")
    tiny = {"student": TINY_STUDENT, "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
            "data": {"num_workers": 0}}
    for old, new in (('"examples/sample_flickr8k"', repr(str(data))),
                     ('"openclip:ViT-B-32:laion2b_s34b_b79k"', '"toy:0"'),
                     ('"train": {"steps": 300}}])', '"train": {"steps": 300}}, TINY])')):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"TINY": tiny}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].steps == 2 and (tmp_path / namespace["result"].student).is_dir()
    scores = namespace["scores"]
    assert scores.kind == "student" and scores.split == "test" and scores.num_images == 4
    assert 0 <= scores.metrics["rsum"] <= 600
    assert str(distill.list_losses()) in capsys.readouterr().out


def test_every_public_name_resolves_lazily():
    for name in distill.__all__:
        assert getattr(distill, name) is not None, name
        assert name in dir(distill)
    assert distill.evaluate.__module__ == "distill.pipeline.evaluate"  # the function, not the command module
    assert distill.TrainRunConfig.__name__ == "TrainRunConfig" and distill.TeacherCache.__name__ == "TeacherCache"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        distill.nope  # noqa: B018


@pytest.mark.parametrize("kind,registry", [("teachers", TEACHERS), ("students", STUDENTS), ("losses", LOSSES),
                                           ("balancers", BALANCERS), ("formats", DATASET_FORMATS)])
def test_list_functions_are_the_sorted_registry_names(kind, registry):
    names = getattr(distill, f"list_{kind}")()
    assert names == sorted(names) == registry.names() and names
    first = names[0]
    assert getattr(distill, f"list_{kind}")(first) == [first]
    assert getattr(distill, f"list_{kind}")(f"*{first[1:]}") == [n for n in names if n.endswith(first[1:])]
    assert getattr(distill, f"list_{kind}")("no-such-*") == []


def test_list_presets_and_the_create_functions():
    assert distill.list_presets() == ["cpu", "gpu", "multiscale", "puma"] and distill.list_presets("g*") == ["gpu"]
    assert "student_clip" in distill.list_losses("*clip*")
    student = distill.create_student("vit", **TINY_STUDENT)
    assert student.embed_dim == TINY_STUDENT["embed_dim"]


def test_mmdistill_list_and_dispatch(capsys, tmp_path):
    assert commands.run(["list", "losses", "--filter", "*clip*"]) == 0
    assert capsys.readouterr().out == "losses: student_clip\n"
    assert commands.run(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == list(commands.KINDS)
    assert commands.run(["list", "lossez"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: mmdistill list lossez: unknown kind")
    assert commands.run(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert commands.run(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert commands.run(["train", "--cache", "c", "--data", "d", "--out", str(tmp_path / "r"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: train.steps (--steps) must be an integer >= 1")


def test_the_console_script_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert scripts == ["mmdistill = distill.pipeline.commands:cli"]
    module, func = scripts[0].split(" = ")[1].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    for name, (module, _) in commands.COMMANDS.items():
        assert hasattr(importlib.import_module(module), "main" if name != "list" else "list_main"), name
