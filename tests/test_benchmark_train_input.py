"""``benchmarks/train_input_speed.py`` at tiny sizes: both parts, one summary line, the documented
fields, and figures consistent with each other."""
from __future__ import annotations

import json

import pytest

from benchmarks import train_input_speed
from tests.helpers.benchmarks import TINY_STUDENT, run_benchmark


@pytest.mark.slow
def test_train_input_speed(tmp_path, capsys, bench_teacher_spec):
    rec = run_benchmark(train_input_speed, tmp_path, capsys, "--data", "synthetic", "--images", "16", "--sizes",
                        "48,32", "--batch-size", "8", "--views", "2", "--warmup", "0", "--repeats", "1", "--teacher",
                        bench_teacher_spec, "--train-teacher", bench_teacher_spec, "--train-steps", "2",
                        "--train-students", "vit-gpu,pruned", "--pruned-text-layers", "1", "--train-batch-size", "4",
                        "--train-workers", "0", "--train-precision", "fp32", "--student-cfg", json.dumps(TINY_STUDENT))
    res = rec["results"]
    assert set(res["input_path"]) == {"48", "32"}
    for size, r in res["input_path"].items():
        rates = r["samples_per_s_per_core"]
        assert set(rates) == {"decode", "pixels", "pixels_normalise_cpu", "jpeg"} and min(rates.values()) > 0
        assert r["speedup_pixels_vs_decode"] == pytest.approx(rates["pixels"] / rates["decode"])
        assert r["samples_per_epoch"] == 16 and r["bytes_per_view"]["raw"] == int(size) ** 2 * 3
        assert r["max_abs_diff_pixels_vs_decode"] < 1e-5  # the pixel path feeds the student the same input
        t = rec["results"]["targets"][f"pixels_vs_decode_{size}px"]
        assert t["value"] == r["speedup_pixels_vs_decode"] and t["met"] == (t["value"] >= 15)
    for name in ("vit-gpu", "pruned"):
        r = res["train"][name]
        assert r["samples_per_s"] > 0 and r["steps"] == 2 and 0 < r["input_share"] < 1
        assert r["forward_gflops_per_sample"] > 0 and r["mfu"] is None  # no peak known on CPU
        assert r["train_tflops"] == pytest.approx(3 * r["forward_gflops_per_sample"] * r["samples_per_s"] / 1e3)
    assert res["train"]["vit-gpu"]["image_size"] == 32
