"""Running ``examples/*.sh`` in a subprocess at tiny settings (3 steps of the tiny training student on
CPU, evaluation every 2 steps) and checking what a finished run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from distill.core.cache.reader import TeacherCache
from distill.pipeline.evaluate import METRIC_ORDER
from students import load_student
from tests.helpers.paths import REPO
from tests.helpers.training import TINY_STUDENT

TRAIN_ARGS = " ".join([*(f"--set student.{k}={v}" for k, v in TINY_STUDENT.items()),
                       "--set train.warmup_steps=1", "--set eval.batch_size=8", "--set 'train.checkpoint_every=2'",
                       "--batch-size 4 --num-workers 0 --device cpu --seed 0"])


def run_script(script: str, args: list[str], cwd: Path, teacher: str, steps: int = 3) -> subprocess.CompletedProcess:
    """Run ``examples/<script> args`` with bash from ``cwd`` with ``teacher`` (the examples' settings come
    from the environment); without ``PYTHONPATH``: the scripts must work
    from anywhere with the package installed."""
    env = {**os.environ, "PYTHON": sys.executable, "TEACHER": teacher, "PRESET": "cpu", "STEPS": str(steps),
           "EVAL_EVERY": "2", "CACHE_ARGS": "--batch-size 8 --num-workers 0 --device cpu",
           "EXTRA_TRAIN_ARGS": TRAIN_ARGS, "EVAL_ARGS": "--batch-size 16 --num-workers 0 --device cpu",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(REPO / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def check_outputs(out: Path, images: Path, n_train: int, n_test: int, stdout: str) -> None:
    """Cache, student, open_clip export (checked against the student on an image of ``images``)
    and result JSONs of a finished run."""
    cache = TeacherCache(out / "cache_train")
    assert (cache.num_images, cache.num_captions) == (n_train, 5 * n_train)
    manifest = json.loads((out / "cache_train" / "manifest.json").read_text())
    assert manifest["dataset"]["split"] == "train" and manifest["storage"]["dtype"] == "fp16"

    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("kind") == "eval"] == [2, 3]  # EVAL_EVERY=2 on the val split
    student = load_student(out / "train" / "student")
    assert student.config()["vision_width"] == TINY_STUDENT["vision_width"]

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'open_clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")
    model.eval()
    ids = tokenizer(["a red dog"])
    image = Image.open(next(images.rglob("*.jpg"))).convert("RGB")
    pixels = preprocess(image)[None]
    assert torch.equal(pixels, student.image_transform()(image)[None])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, normalize=True), student.encode_text({"input_ids": ids}).embed)
        torch.testing.assert_close(model.encode_image(pixels, normalize=True), student.encode_image(pixels).embed)

    results = {k: json.loads((out / "results" / f"{k}.json").read_text())
               for k in ("teacher", "student", "student_open_clip")}
    for r in results.values():
        assert (r["split"], r["num_images"], r["num_captions"]) == ("test", n_test, 5 * n_test)
        assert list(r["metrics"]) == list(METRIC_ORDER)
        assert r["metrics"]["rsum"] == pytest.approx(sum(r["metrics"][k] for k in METRIC_ORDER[:-1]))
        assert all(0 <= r["metrics"][k] <= 100 for k in METRIC_ORDER[:-1])
    assert results["teacher"]["kind"] == "teacher" and results["student"]["kind"] == "student"
    # the exported folder scores exactly like the trained student
    assert results["student_open_clip"]["metrics"] == pytest.approx(results["student"]["metrics"])

    table = (out / "results" / "comparison.txt").read_text().splitlines()
    assert table[0].split() == ["model", *METRIC_ORDER, "rsum", "%", "images"]
    assert [line.split()[0] for line in table[2:]] == ["teacher", "student", "student_open_clip"]
    assert table[2].split()[-2:] == ["100.0", str(n_test)]
    assert "\n".join(table) in stdout
