"""The recipe study (benchmarks/recipe_study.py): row names, plans, per-row config layers, the
analysis and targets over seeds, and (slow) a tiny end-to-end run on CPU."""
from __future__ import annotations

import json

import pytest

from tests.helpers.benchmarks import mini_flickr8k


def test_row_names_parse_and_bad_ones_name_the_part():
    from benchmarks import recipe_study as r

    spec = r.parse_row("vit.cd_cos.dynamic_ra.v4.half.s1")
    assert spec == {"student": "vit", "terms": "cd_cos", "balancer": "dynamic_ra", "views": "v4", "budget": "half",
                    "seed": 1}
    for bad, part in (("vit.cd_cos.fixed.v4.half", "expected"), ("vit.cd_cox.fixed.v4.half.s0", "terms"),
                      ("cnn.cd.fixed.v4.half.s0", "student"), ("vit.cd.fixed.v4.eqtime.s0", "eqtime")):
        with pytest.raises(r.StudyError, match=part):
            r.parse_row(bad)
    assert all(r.parse_row(f"{row}.half.s0") for row in r.SCREEN)


def test_row_layers_set_terms_balancer_views_and_budget(tmp_path):
    from benchmarks import recipe_study as r

    study = r.Study(r.parse_args(["--out", str(tmp_path / "x.json"), "--work", str(tmp_path / "w")]))
    (vit, layer) = study.layers(r.parse_row("vit.cd_cos.dynamic_ra.v1.half.s0"))
    assert vit["student"] == {"name": "vit"} and "init_projections" not in vit["train"]
    assert layer["train"]["steps"] == study.full_steps("vit")[0] // 2
    assert [x["name"] for x in layer["losses"]] == ["contrastive_distill", "cosine", "student_clip"]
    assert layer["balancer"] == {"name": "dynamic", "cfg": {"scale": "value", "ref_after": 200}}
    assert layer["data"] == {"max_views": 1}
    (_, default) = study.layers(r.parse_row("vit.default.default.v6.full.s0"))
    assert set(default) == {"train"}  # the library's defaults: no losses, balancer or views given


def test_analysis_and_targets_over_seeds():
    from benchmarks import recipe_study as r

    def row(name, rsum):
        return {"row": name, "rsum": rsum, "spec": r.parse_row(name)}

    rows = [row("vit.default.default.v6.full.s0", 90.0), row("vit.default.default.v6.full.s1", 94.0),
            row("vit.clip_only.fixed.v6.full.s0", 30.0), row("vit.clip_only.fixed.v6.full.s1", 30.0),
            row("vit.clip_only.fixed.v6.eqtime.s0", 31.0), row("vit.clip_only.fixed.v6.eqtime.s1", 33.0),
            row("vit.cd_cos.fixed.v6.full.s0", 95.0), row("vit.cd_cos.fixed.v6.full.s1", 97.0),
            row("vit.cd.fixed.v6.full.s0", 101.0), row("vit.cd.fixed.v6.full.s1", 103.0),
            row("vit.cd.fixed.v6.half.s0", 70.0), row("vit.cd_cos.fixed.v6.half.s0", 75.0),
            row("vit.all7.fixed.v6.half.s0", 60.0)]
    results = {x["row"]: x for x in rows}
    t = r.targets(results)
    assert t["vit_default_vs_clip_only_equal_steps"]["value"] == pytest.approx(92 / 30)
    assert t["vit_default_vs_clip_only_equal_steps"]["met"] and t["vit_default_vs_clip_only_equal_time"]["met"]
    assert t["default_vs_vit.cd_cos.fixed.v6.full"]["value"] == pytest.approx(-4.0)
    assert t["default_vs_vit.cd_cos.fixed.v6.full"]["met"]  # 4 points below: within the seed spread of 4
    assert not t["default_vs_vit.cd.fixed.v6.full"]["met"]  # 10 points below
    a = r.analyse(results)
    assert a["vit.cd_cos.fixed.v6.full"]["vs_default"]["delta"] == pytest.approx(4.0)
    assert r.best_screen(results, "vit", 2) == ["vit.cd_cos.fixed.v6", "vit.cd.fixed.v6"]
    assert "vit.cd_cos.fixed.v6.full" in r.markdown(results)


@pytest.mark.slow
def test_study_runs_rows_end_to_end_and_accumulates(tmp_path):
    from benchmarks import recipe_study as r

    data = mini_flickr8k(tmp_path / "f8k")
    out = tmp_path / "study.json"
    tiny = ["--device", "cpu", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(out),
            "--grad-share-every", "1", "--steps", "2", "--vit-steps", "2", "--batch-size", "4", "--vit-batch-size", "4",
            "--workers", "0", "--image-size", "64", "--probe-epochs", "1", "--teacher-epochs", "1",
            "--teacher-batch-size", "8", "--views", "2", "--mixup-views", "1", "--pixels", "32",
            "--cache-batch-size", "8", "--init-projections", "8", "--eval-batch-size", "16"]
    report = r.main(["--plan", "vit.cd_cos.fixed.v1.full.s0,pruned.clip_only.fixed.v6.eqtime.s0", *tiny])
    by = {x["row"]: x for x in report["rows"]}
    # eqtime ran the default and clip_only full rows it is measured against
    assert set(by) == {"vit.cd_cos.fixed.v1.full.s0", "pruned.clip_only.fixed.v6.eqtime.s0",
                       "pruned.default.default.v6.full.s0", "pruned.clip_only.fixed.v6.full.s0"}
    vit = by["vit.cd_cos.fixed.v1.full.s0"]
    assert set(vit["grad_share"]) == {"contrastive_distill", "cosine", "student_clip"}
    assert sum(vit["grad_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert vit["train_steps"] == 2 and vit["samples_per_s"] > 0 and vit["train_seconds"] > 0
    assert json.loads(out.read_text())["rows"] == report["rows"]
    again = r.main(["--plan", "vit.cd_cos.fixed.v1.full.s0", *tiny])  # reused, not retrained
    assert {x["row"] for x in again["rows"]} == set(by)
