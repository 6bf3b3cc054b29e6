"""Every option of a named piece (loss, balancer, student, the teacher a student names) is checked
when the config is read, before the cache or any data is opened: one ConfigError line naming the
full key (issue 19.4)."""
from __future__ import annotations

import pytest

import distill.train_student
from distill.core.errors import ConfigError, DistillError
from distill.core.registry import BALANCERS, LOSSES, create_balancer, create_loss
from distill.distiller import build_losses
from distill.losses.base import Dims
from distill.pipeline.cli import USER_ERRORS, run_cli
from distill.pipeline.train.config import TrainRunConfig

TWO_STAGES = [{"name": "warm", "steps": 2, "losses": ["cosine"]},
              {"losses": ["cosine", "triplet", {"name": "contrastive_distill", "cfg": {"temprature": 0.1}}]}]
CD_OPTIONS = "queue_size, temperature, terms, gather, text_target, multi_positive"


@pytest.mark.parametrize("layer,line", [
    ({"stages": TWO_STAGES},  # loss
     f"stages[1].losses[2].cfg.temprature: unknown option of loss 'contrastive_distill'; known: {CD_OPTIONS}"),
    ({"losses": [{"name": "triplet", "cfg": {"margn": 0.1}}]},
     "losses[0].cfg.margn: unknown option of loss 'triplet'; known: margin"),
    ({"losses": ["cosine", "cosin"]}, "losses[1].name: unknown loss 'cosin'; known: coma_reconstruct, "),
    ({"balancer": {"name": "fixed", "cfg": {"wieghts": {"cosine": 2}}}},  # balancer
     "balancer.cfg.wieghts: unknown option of balancer 'fixed'; known: weights"),
    ({"stages": [{"steps": 2, "losses": ["cosine"], "balancer": {"name": "gradnorm", "cfg": {"alpah": 1}}}, {}]},
     "stages[0].balancer.cfg.alpah: unknown option of balancer 'gradnorm'; known: alpha, lr, betas, min_weight"),
    ({"stages": [{"steps": 2, "losses": ["cosine"]}, {"balancer": {"name": "dynamic", "cfg": {"temprature": 1}}}]},
     "stages[1].balancer.cfg.temprature: unknown option of the dynamic balancer; known: temperature, "),
    ({"student": {"name": "vit", "vison_layers": 4}},  # student
     "student.vison_layers: unknown option of student 'vit'; known: preset, embed_dim, "),
    ({"student": {"name": "vit", "preset": "vit-tiny"}}, "student.preset: unknown vit preset 'vit-tiny'; known: "),
    ({"student": {"name": "pruned", "teacher": "toy:0", "image_layer": 1, "text_layers": 1}},
     "student.image_layer: unknown option of student 'pruned'; known: teacher, image_layers, text_layers, "),
    ({"student": {"name": "pruned", "teacher": "toyy:0", "image_layers": 1, "text_layers": 1}},  # teacher
     "student.teacher: unknown teacher 'toyy'; known: ensemble, hf, lit, mllm, openclip, "),
    ({"student": {"name": "pruned", "teacher": "ensemble:toy:0+tooy:1", "image_layers": 1, "text_layers": 1}},
     "student.teacher: ensemble member 'tooy:1': unknown teacher 'tooy'; known: "),
])
def test_a_misspelt_option_is_one_line_naming_the_full_key(layer, line):
    with pytest.raises(ConfigError) as info:
        TrainRunConfig.from_dict(layer)
    msg = str(info.value)
    assert msg.startswith(line) and "\n" not in msg, msg


@pytest.mark.parametrize("layer,line", [
    ({"losses": [{"name": "contrastive_distill", "cfg": {"temperature": -1}}]},
     "losses[0].cfg: contrastive_distill: queue_size must be >= 0 and temperature > 0"),
    ({"stages": [{"steps": 3, "losses": ["cosine", "token"], "balancer": {"name": "fixed", "cfg": {"weights": {"tokn": 1}}}},
                 {}]},
     "stages[0].balancer.cfg.weights: weights given for unknown terms ['tokn']; terms are ['cosine', 'token']"),
    ({"balancer": {"name": "dsmd", "cfg": {"temperature": 0}}}, "balancer.cfg.temperature must be a number > 0, got 0"),
    ({"balancer": {"name": "dsmd", "cfg": {"beta": 1.5}}}, "balancer.cfg.beta must be a number in [0, 1), got 1.5"),
    ({"balancer": {"name": "uncertainty", "cfg": {"init": "big"}}},
     "balancer.cfg.init must be a finite number (the initial log-variance), got 'big'"),
    ({"balancer": {"name": "gradnorm", "cfg": {"betas": [0.9]}}}, "balancer.cfg.betas must be two numbers in [0, 1)"),
    ({"student": {"name": "vit", "vision_width": 30, "vision_heads": 4}},
     "student.vision_width=30 is not divisible by vision_heads=4"),
    ({"losses": [{"name": "cosine", "cfg": {"gather": True}}]},
     "losses[0].cfg.gather: not an option in training: the Distiller hands every loss the batch already gathered"),
    ({"student": {"name": "pruned", "teacher": "toy:0", "image_layers": 1}},
     "student.text_layers: required option of student 'pruned' is not given"),
])
def test_bad_option_values_are_refused_naming_the_entry(layer, line):
    with pytest.raises(ConfigError) as info:
        TrainRunConfig.from_dict(layer)
    assert str(info.value).startswith(line), str(info.value)


def test_the_command_refuses_a_misspelt_option_before_opening_the_cache_or_data(tmp_path, capsys, monkeypatch):
    """In-process ``python -m distill.train_student`` main(argv): the cache and the dataset do not
    exist, so anything that opened them would fail with another message; nothing is written."""
    import distill.pipeline.train.main as ts

    opened = []
    monkeypatch.setattr(ts, "TeacherCache", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(ts, "load_dataset", lambda *a, **k: opened.append(a))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("losses:\n  - name: cosine\n  - {name: contrastive_distill, cfg: {temprature: 0.1}}\n")
    out = tmp_path / "run"
    argv = ["--cache", str(tmp_path / "cache"), "--data", str(tmp_path / "x.tsv"), "--out", str(out), "--device", "cpu",
            "--config", str(cfg)]
    assert run_cli(distill.train_student.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: losses[1].cfg.temprature: unknown option of loss 'contrastive_distill'; known: {CD_OPTIONS}"]
    assert not opened and not out.exists()
    for flag, line in ((["--set", "student.vison_layers=4"], "error: student.vison_layers: unknown option of student 'vit'"),
                       (["--set", "balancer.cfg.wieghts={}", "--set", "balancer.name=fixed"],
                        "error: balancer.cfg.wieghts: unknown option of balancer 'fixed'; known: weights")):
        assert run_cli(distill.train_student.main, argv[:-2] + flag) == 2
        assert capsys.readouterr().err.strip().startswith(line)
    assert not opened and not out.exists()


def test_factories_bind_options_too():
    dims = Dims(4, 4, 4, 4, 4, 4)
    with pytest.raises(ConfigError, match=r"^temprature: unknown option of loss 'contrastive_distill'; known: queue_size"):
        create_loss("contrastive_distill", dims, temprature=0.1)
    with pytest.raises(ConfigError, match=r"^foo: unknown option of loss 'cosine'; known: \(none\)$"):
        create_loss("cosine", dims, foo=1)
    with pytest.raises(ConfigError, match=r"^weights: unknown option of balancer 'uncertainty'; known: init$"):
        create_balancer("uncertainty", ["a"], weights={})
    assert LOSSES.options("triplet") == (["margin"], [], False)
    assert BALANCERS.options("dynamic")[2]  # **kwargs it checks itself


def test_build_losses_refuses_gather_instead_of_overriding_it():
    dims = Dims(4, 4, 4, 4, 4, 4)
    with pytest.raises(ConfigError, match="gather is not an option in training"):
        build_losses(dims, [{"name": "student_clip", "cfg": {"gather": True}}])
    loss = build_losses(dims, [{"name": "student_clip", "cfg": {}}])["student_clip"]
    assert loss.gather is False  # the Distiller gathers the batch once for every loss
    assert create_loss("student_clip", dims).gather is True  # on its own, a loss gathers by default


def test_user_errors_are_the_typed_hierarchy_and_a_bug_keeps_its_traceback(capsys):
    assert DistillError in USER_ERRORS and ValueError not in USER_ERRORS

    def buggy(argv):
        raise ValueError("an internal invariant broke")

    with pytest.raises(ValueError, match="internal invariant"):
        run_cli(buggy, [])
    assert "internal error: ValueError is a bug" in capsys.readouterr().err

    def refused(argv):
        raise ConfigError("x.y: bad")

    assert run_cli(refused, []) == 2
    assert capsys.readouterr().err.strip() == "error: x.y: bad"
