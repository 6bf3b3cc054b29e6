"""The CPU twin of ``benchmarks/gpu_smoke.sh`` (``--device cpu --tiny``, fp32 and bf16), so the
GPU smoke script cannot rot: every stage must pass and leave its result files, and the runs that
only change how the student runs (deterministic mode, channels_last) must train like the default."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from distill.pipeline.train.log import read_log
from tests.helpers.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu_smoke.sh"
BENCHMARKS = ["eval_speed", "inference_speed", "train_step_speed", "cache_loader_speed", "token_storage_bytes",
              "peak_memory", "tuning_memory", "train_input_speed"]
STUDENTS = ["vit", "pruned", "pmf", "mwa"]
STEPS = 3


def smoke(out, *flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), "--steps", str(STEPS),
                           "--precisions", "fp32 bf16", "--timeout", "300", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"], proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"gpu_smoke: {len(summary['stages'])}/{len(summary['stages'])} stages ok")
    assert summary["device"] == "cpu"
    assert all(s["status"] == "ok" and s["rc"] == 0 and s["seconds"] > 0 for s in summary["stages"].values())
    return summary


@pytest.mark.slow
def test_smoke_benchmarks(tmp_path):
    summary = smoke(tmp_path, "--skip-train", "--jobs", "2")  # the side-by-side path of the CUDA default
    assert list(summary["stages"]) == ["setup"] + [f"bench_{b}" for b in BENCHMARKS]
    for b in BENCHMARKS:
        record = json.loads((tmp_path / "bench" / f"{b}.json").read_text())
        assert record["benchmark"] == b and record["environment"]["device"] == "cpu"


@pytest.mark.slow
def test_smoke_training(tmp_path):
    summary = smoke(tmp_path, "--skip-bench")
    runs = [f"{s}-{p}" for s in STUDENTS for p in ("fp32", "bf16")]
    extra = ["vit-fp32-deterministic", "pruned-gradnorm-bf16", "pruned-channels_last"]
    assert list(summary["stages"]) == ["setup", "cache"] + [f"train_{r}" for r in runs + extra]
    final = {}
    for r in runs + extra:
        stage = summary["stages"][f"train_{r}"]
        log = read_log(tmp_path / "train" / r)
        assert [x["step"] for x in log] == list(range(1, STEPS + 1))  # log_every 1 at 3 steps
        assert stage["steps"] == STEPS and stage["final_total"] == log[-1]["total"] and stage["skipped_nonfinite"] == 0
        assert (tmp_path / "train" / r / "student").is_dir()
        final[r] = log[-1]["total"]
    # deterministic mode and channels_last change how the student runs, not what it computes
    assert final["vit-fp32-deterministic"] == pytest.approx(final["vit-fp32"], rel=1e-6)
    assert final["pruned-channels_last"] == pytest.approx(final["pruned-fp32"], rel=1e-4)
    assert final["pruned-gradnorm-bf16"] != final["pruned-bf16"]  # the balancer did take part
