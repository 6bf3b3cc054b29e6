"""Every ``benchmarks/`` script at tiny sizes through its ``main(argv)``: one summary line, a result
JSON with the environment and the documented fields, and figures consistent with each other."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import (cache_loader_speed, cache_verify_cost, common, eval_speed, inference_speed, peak_memory,
                        token_storage_bytes, train_step_speed)
from distill.core.metrics import retrieval_metrics
from tests.helpers.benchmarks import TINY_STUDENT, run_benchmark


def test_time_interleaved_records_both_clocks():
    calls = []
    t = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 2,
                                torch.device("cpu"), "cpu")
    assert calls == ["a", "b"] * 3
    assert len(t["a"].wall) == len(t["a"].cpu) == 2 and t["a"].times == t["a"].cpu
    assert t["b"].to_json()["clock"] == "cpu"
    with pytest.raises(ValueError, match="clock"):
        common.time_interleaved({"a": lambda: None}, 0, 1, torch.device("cpu"), "gpu")


def test_peak_rss_sees_an_allocation():
    with common.PeakRSS() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.delta_mb > 32 and mem.peak_mb >= mem.baseline_mb


def test_train_step_speed(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(train_step_speed, tmp_path, capsys, "--teacher", bench_teacher_spec, "--student-cfg",
                        json.dumps(TINY_STUDENT), "--data", "synthetic", "--images", "8", "--batch-size", "4",
                        "--repeats", "1")
    r = rec["results"]
    med = {k: v["median_s"] for k, v in r["seconds_per_step"].items()}
    assert set(med) == {"teacher", "student", "loader", "cache", "online"} and all(v > 0 for v in med.values())
    assert r["ideal_speedup"] == pytest.approx((med["teacher"] + med["student"]) / med["student"])
    assert r["speedup_cache_vs_online"] == pytest.approx(med["online"] / med["cache"])
    assert r["fraction_of_ideal"] == pytest.approx(r["speedup_cache_vs_online"] / r["ideal_speedup"])
    assert r["pass"] == (r["fraction_of_ideal"] >= 0.9)
    assert r["losses"][0] == "contrastive_distill" and r["student_params"] > 0
    assert rec["settings"]["clock"] == "cpu" and rec["settings"]["cache_dims"]["image_tokens"] == [16, 32]


def test_cache_loader_speed(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(cache_loader_speed, tmp_path, capsys, "--teacher", bench_teacher_spec, "--data", "synthetic",
                        "--images", "12", "--batch-size", "4", "--repeats", "1")
    r = rec["results"]
    # fp16: image embed 16 + tokens 16x32, caption embed 16 + tokens L x 32 (+ L mask bytes), L = 16 here
    assert r["stored_bytes_per_sample"] == 2 * (16 + 16 * 32) + 2 * (16 + 16 * 32) + 16
    # the loader hands fp16 features over as stored (the trainer converts them on the device)
    assert r["bytes_per_sample_returned"] == 2 * (16 + 16 * 32) * 2
    assert r["samples_per_epoch"] == 12
    assert r["loader_fraction_of_memcpy"] == pytest.approx(r["loader_samples_per_s"] / r["memcpy_samples_per_s"])
    with pytest.raises(SystemExit, match="--clock wall"):
        cache_loader_speed.main(["--num-workers", "1", "--out", str(tmp_path / "x.json")])


def test_cache_verify_cost(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(cache_verify_cost, tmp_path, capsys, "--teacher", bench_teacher_spec, "--data", "synthetic",
                        "--images", "12", "--batch-size", "4", "--repeats", "1", "--warmup", "0")
    r = rec["results"]
    assert r["num_images"] == 12 and r["stored_bytes_per_image"] == pytest.approx(r["cache_bytes"] / 12)
    assert r["default_verify_picks"] == "lazy"  # a few kB per image: below the 64 kB threshold
    t = r["targets"]
    assert t["hash_fraction_of_epoch_lower_bound"]["value"] == pytest.approx(r["hash_fraction_of_epoch_lower_bound"])
    assert t["default_is_lazy_only_when_cheap"]["met"] == (t["hash_fraction_of_epoch_lower_bound"]["value"] < 0.05)
    assert rec["targets"] == t  # also at the top level of the JSON


def test_token_storage_bytes(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(token_storage_bytes, tmp_path, capsys, "--teacher", bench_teacher_spec, "--data", "synthetic",
                        "--images", "6", "--grid", "2")
    modes = rec["results"]["modes"]
    assert list(modes) == ["full_fp32", "full_fp16", "grid2_fp16", "full_int8"]
    tok = {m: modes[m]["arrays"]["image_tokens"] for m in modes}
    assert tok == {"full_fp32": 16 * 32 * 4, "full_fp16": 16 * 32 * 2, "grid2_fp16": 4 * 32 * 2, "full_int8": 16 * 32}
    assert modes["full_int8"]["arrays"]["image_tokens_scale"] == 16 * 4
    assert modes["full_fp32"]["ratio_per_image_with_captions_vs_full_fp32"] == 1.0
    for m in ("full_fp16", "grid2_fp16", "full_int8"):
        r = modes[m]["ratio_per_image_with_captions_vs_full_fp32"]
        assert r == pytest.approx(modes[m]["per_image_with_captions"] / modes["full_fp32"]["per_image_with_captions"])
    assert modes["full_int8"]["per_image_with_captions"] < modes["full_fp16"]["per_image_with_captions"]
    assert modes["grid2_fp16"]["image_total"] < modes["full_fp16"]["image_total"]


def test_eval_speed(tmp_path, capsys):
    rec = run_benchmark(eval_speed, tmp_path, capsys, "--images", "300", "--captions", "1500", "--dim", "32",
                        "--chunk-size", "128", "--scale", "600x3000", "--repeats", "1")
    r = rec["results"]
    img, txt, cap = eval_speed.embeddings(300, 1500, 32, 1.0, 0, torch.device("cpu"))
    assert r["base"]["metrics"] == retrieval_metrics(img, txt, cap, chunk_size=128)  # exact, same ranks
    assert [(s["images"], s["captions"]) for s in r["scaling"]] == [(600, 3000)]
    s = r["scaling"][0]
    assert s["per_pair_time_vs_base"] == pytest.approx(s["seconds_per_gpair"] / r["base"]["seconds_per_gpair"])
    assert r["extrapolated_100k_x_500k_s"] == pytest.approx(s["seconds_per_gpair"] * 5e10 / 1e9)
    assert r["tile"] == 128 and r["pass"] == (r["base"]["seconds"] < 2.0)
    assert r["base"]["full_score_matrix_mb"] == pytest.approx(300 * 1500 * 4 / 2**20)
    assert eval_speed.size("10000x50000") == (10000, 50000)


def test_inference_speed(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(inference_speed, tmp_path, capsys, "--teacher", bench_teacher_spec, "--student-cfg",
                        json.dumps(TINY_STUDENT), "--image-batch", "2", "--text-batch", "4", "--repeats", "1")
    r = rec["results"]
    sec = {k: v["median_s"] for k, v in r["seconds_per_batch"].items()}
    assert r["images_per_s"]["student"] == pytest.approx(2 / sec["student_image"])
    assert r["texts_per_s"]["teacher"] == pytest.approx(4 / sec["teacher_text"])
    assert r["image_speedup"] == pytest.approx(r["images_per_s"]["student"] / r["images_per_s"]["teacher"])
    assert r["pass"] == (r["image_speedup"] >= 10 and r["text_speedup"] >= 10)
    assert r["image_size"] == {"teacher": 32, "student": 32} and r["params"]["student"] > 0


@pytest.mark.slow
def test_peak_memory(bench_teacher_spec, tmp_path, capsys):
    rec = run_benchmark(peak_memory, tmp_path, capsys, "--teacher", bench_teacher_spec, "--student-cfg",
                        json.dumps(TINY_STUDENT), "--data", "synthetic", "--images", "4", "--batch-size", "2",
                        "--steps", "1")
    r = rec["results"]
    assert set(r["phases"]) == {"baseline", "caching", "training"}
    for phase in ("caching", "training"):
        assert r["phases"][phase]["peak_rss_mb"] >= r["phases"]["baseline"]["peak_rss_mb"] > 100
        assert r["net_peak_rss_mb"][phase] == pytest.approx(r["phases"][phase]["peak_rss_mb"] - r["phases"]["baseline"]["peak_rss_mb"])
    assert r["training_vs_caching_peak_rss"] == pytest.approx(r["phases"]["training"]["peak_rss_mb"] / r["phases"]["caching"]["peak_rss_mb"])


def test_quality_rows_are_reused_resumed_or_retrained(tmp_path, monkeypatch):
    """``quality_flickr8k``: a finished row with the same training config is reused, an interrupted
    one resumes in place, and one trained with other settings is deleted (eval.json included) and
    retrained."""
    from benchmarks import quality_flickr8k as q
    from distill.pipeline.train import main as train_student

    calls: list[dict] = []

    def fake_train(config: dict, resume: str | None = None, overwrite: bool = False) -> train_student.TrainResult:
        assert resume == "auto"
        calls.append(config)
        student = Path(config["out"]) / "student"
        student.mkdir(parents=True, exist_ok=True)
        (student / "student.json").write_text("{}")
        return train_student.TrainResult(1, 0.5, 0, 0, 0.1, student)

    monkeypatch.setattr(train_student, "train", fake_train)
    bench = q.Bench(q.parse_args(["--work", str(tmp_path)]))
    pruned = {"name": "pruned", "teacher": "prunetoy:0", "image_layers": 1, "text_layers": 1}  # options checked
    config = bench.train_config("row", tmp_path / "cache", {"student": pruned})
    assert config["data"]["cache"] == str(tmp_path / "cache") and config["student"] == pruned
    assert bench.train("row", config) == tmp_path / "row" / "student" and len(calls) == 1
    assert json.loads((tmp_path / "row" / "summary.json").read_text())["steps"] == 1
    (tmp_path / "row" / "eval.json").write_text("{}")
    bench.train("row", config)
    assert len(calls) == 1 and (tmp_path / "row" / "eval.json").is_file()  # reused
    (tmp_path / "row" / "student" / "student.json").unlink()  # interrupted: checkpoints stay
    (tmp_path / "row" / "checkpoints").mkdir()
    bench.train("row", config)
    assert len(calls) == 2 and (tmp_path / "row" / "checkpoints").is_dir()
    other = bench.train_config("row", tmp_path / "cache", {"student": pruned}, {"train": {"lr": 1e-3}})
    bench.train("row", other)
    assert len(calls) == 3 and not (tmp_path / "row" / "eval.json").exists()
    assert not (tmp_path / "row" / "checkpoints").exists()
    assert json.loads((tmp_path / "row" / "config.json").read_text()) == other
