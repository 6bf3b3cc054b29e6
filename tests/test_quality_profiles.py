"""The quality benchmark's profiles: the GPU profile runs end to end on CPU with tiny settings (every
core row: both teachers, seeded distilled / no-teacher rows, ablations), and its report carries the
issue's targets computed from the rows."""
from __future__ import annotations

import json

import pytest

from tests.helpers.benchmarks import mini_flickr8k

def test_profiles_resolve_and_explicit_flags_win():
    from benchmarks import quality_flickr8k as q

    cpu, gpu = q.parse_args(["--profile", "cpu"]), q.parse_args(["--profile", "gpu", "--steps", "7"])
    assert cpu.steps == q.PROFILES["cpu"]["steps"] and cpu.views == q.PROFILES["cpu"]["views"]
    # the CPU profile is where the students learn: >= 8 epochs of the 6,000 training images for the
    # ViT rows, >= 3 for the pruned rows; the smoke profile keeps the former 150 steps
    assert cpu.vit_steps * cpu.vit_batch_size >= 8 * 6000 and cpu.steps * cpu.batch_size >= 3 * 6000
    assert cpu.rows == "main" and q.parse_args(["--profile", "smoke"]).steps == 150
    assert gpu.steps == 7 and gpu.batch_size == q.PROFILES["gpu"]["batch_size"]
    assert gpu.views + gpu.mixup_views >= 16  # patient teaching: many cached views on the GPU profile
    assert str(gpu.out).endswith("quality_flickr8k_gpu.json") and gpu.work.endswith("quality_flickr8k_gpu")
    rows = q.expand_rows("core", [0, 1])
    assert {"teacher", "teacher_probe", "pruned_distilled_s1", "vit_no_teacher_s0", "abl_dsmd", "abl_one_view"} <= set(rows)
    assert q.expand_rows("pruned_distilled,abl_fixed", [3]) == ["pruned_distilled_s3", "abl_fixed"]


def test_targets_use_seed_means_and_spread():
    from benchmarks import quality_flickr8k as q

    def row(name, rsum, gflops=0.15):
        return {"row": name, "rsum": rsum, "image_gflops": gflops}

    by = {r["row"]: r for r in [
        row("teacher", 200.0, 0.30), row("pruned_distilled_s0", 184.0), row("pruned_distilled_s1", 188.0),
        row("pruned_no_teacher_s0", 160.0), row("pruned_no_teacher_s1", 164.0), row("vit_distilled_s0", 60.0),
        row("vit_distilled_s1", 64.0), row("vit_no_teacher_s0", 30.0), row("vit_no_teacher_s1", 30.0),
        row("abl_global_only", 183.0), row("abl_dsmd", 170.0)]}
    agg = q.aggregate(by)
    assert agg["pruned_distilled"]["mean"] == 186.0 and agg["pruned_distilled"]["spread"] == 4.0
    t = q.targets(by, agg)
    assert t["vit_distilled_vs_no_teacher_rsum"]["met"] and t["vit_distilled_vs_no_teacher_rsum"]["value"] == pytest.approx(62 / 30)
    assert t["pruned_vs_teacher_rsum"]["met"] and t["pruned_image_flops_vs_teacher"]["met"]
    assert t["pruned_distilled_vs_no_teacher_rsum"]["met"]
    assert not t["full_vs_abl_global_only"]["met"]  # 3 points better, but within the seed spread of 4
    assert t["full_vs_abl_dsmd"]["met"]
    one = {k: v for k, v in by.items() if not k.endswith("_s1")}  # one seed: no spread to judge against
    t1 = q.targets(one, q.aggregate(one))
    assert t1["full_vs_abl_dsmd"]["met"] is None and t1["full_vs_abl_dsmd"]["value"] == 14.0
    assert t1["pruned_distilled_vs_no_teacher_rsum"]["met"]


@pytest.mark.slow
def test_gpu_profile_runs_end_to_end_on_cpu_with_tiny_settings(tmp_path):
    from benchmarks import quality_flickr8k as q

    data = mini_flickr8k(tmp_path / "f8k")
    out = tmp_path / "result.json"
    report = q.main(["--profile", "gpu", "--device", "cpu", "--data", str(data), "--work", str(tmp_path / "work"),
                     "--out", str(out), "--steps", "2", "--batch-size", "4", "--workers", "0", "--image-size", "64",
                     "--probe-epochs", "1", "--teacher-epochs", "1", "--teacher-batch-size", "8", "--views", "2",
                     "--mixup-views", "1", "--pixels", "32", "--cache-batch-size", "8", "--init-projections", "8",
                     "--eval-batch-size", "16"])
    rows = {r["row"] for r in report["rows"]}
    assert rows == set(q.expand_rows("core", [0, 1]))
    assert report["profile"] == "gpu" and report["settings"]["views"] == 2 and report["settings"]["steps"] == 2
    assert set(report["seeds"]) == set(q.SEEDED) and all(len(v["rsum"]) == 2 for v in report["seeds"].values())
    assert {"pruned_vs_teacher_rsum", "vit_distilled_vs_no_teacher_rsum", "pruned_distilled_vs_no_teacher_rsum",
            "full_vs_abl_dsmd", "full_vs_abl_one_view", "pruned_image_flops_vs_teacher"} <= set(report["targets"])
    assert report["targets"]["pruned_image_flops_vs_teacher"]["value"] <= 0.5
    cache = json.loads((tmp_path / "work" / "cache" / "manifest.json").read_text())
    assert cache["views"]["count"] == 3 and cache["storage"]["pixels"]["size"] == 32
    teacher = json.loads((tmp_path / "work" / "teacher_finetuned" / "lit.json").read_text())
    assert teacher["training"]["mode"] == "finetune"
    assert json.loads(out.read_text())["targets"] == report["targets"] and out.with_suffix(".md").is_file()
    # a rerun reuses every finished row, teacher and cache (nothing is retrained)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/eval.json")}
    again = q.main(["--profile", "gpu", "--device", "cpu", "--data", str(data), "--work", str(tmp_path / "work"),
                    "--out", str(out), "--steps", "2", "--batch-size", "4", "--workers", "0", "--image-size", "64",
                    "--probe-epochs", "1", "--teacher-epochs", "1", "--teacher-batch-size", "8", "--views", "2",
                    "--mixup-views", "1", "--pixels", "32", "--cache-batch-size", "8", "--init-projections", "8",
                    "--eval-batch-size", "16", "--rows", "teacher,abl_fixed"])
    assert [r["row"] for r in again["rows"]] == ["teacher", "abl_fixed"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
