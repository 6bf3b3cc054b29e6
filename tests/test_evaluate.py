"""``python -m distill.evaluate`` on a teacher, a cache and a student checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from distill.pipeline import evaluate as ev
from distill.core.errors import CacheMismatchError, ConfigError
from distill.core.data.factory import load_dataset
from students import create_student, save_student
from teachers import create_teacher
from tests.helpers.caches import build_cache
from tests.helpers.data import make_tiny_dataset
from tests.helpers.training import TINY_STUDENT


def test_teacher_cache_and_model_agree(tiny_tsv, tmp_path):
    data = load_dataset(tiny_tsv)
    teacher = create_teacher("toy:0")
    direct = ev.evaluate_model(teacher, data, batch_size=5, progress=False)
    cache = build_cache(tiny_tsv, tmp_path / "cache")
    out = tmp_path / "r.json"
    assert ev.main(["--model", str(cache), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res) == ["model", "label", "kind", "data", "split", "num_images", "num_captions", "skipped", "seconds",
                         "metrics"]
    assert res["kind"] == "cache" and res["num_images"] == 12 and res["num_captions"] == 24
    # the cache is fp16: recalls may only move by a tie or two
    assert abs(res["metrics"]["rsum"] - direct["rsum"]) <= 2 * 100 / 12
    lib = ev.evaluate(str(cache))  # the library call returns the typed result the JSON is written from
    assert isinstance(lib, ev.EvalResult) and lib.metrics["i2t_R@1"] == res["metrics"]["i2t_R@1"]
    assert {**lib.to_json(), "seconds": 0} == {**res, "seconds": 0}
    res_t = ev.evaluate("toy:0", str(tiny_tsv), num_workers=0)
    assert res_t.metrics == direct


def test_student_checkpoint(tiny_tsv, tmp_path):
    torch.manual_seed(0)
    student = create_student("vit", **TINY_STUDENT)
    folder = save_student(student, tmp_path / "student")
    res = ev.evaluate(str(folder), str(tiny_tsv), num_workers=0)
    assert res.kind == "student"
    assert set(ev.METRIC_ORDER) <= set(res.metrics)
    assert 0 <= res.metrics["rsum"] <= 600
    assert ev.main(["--model", str(folder), "--data", str(tiny_tsv), "--num-workers", "0"]) == 0


def test_cache_of_other_data_is_rejected(tiny_tsv, tmp_path):
    cache = build_cache(tiny_tsv, tmp_path / "cache")
    other = make_tiny_dataset(tmp_path / "other", seed=1)
    with pytest.raises(CacheMismatchError):
        ev.main(["--model", str(cache), "--data", str(other)])
    with pytest.raises(CacheMismatchError):
        ev.evaluate(str(cache), str(other))


def test_unknown_model_is_a_clear_error(tiny_tsv):
    with pytest.raises(ConfigError, match="neither an existing"):
        ev.main(["--model", "nosuch/path", "--data", str(tiny_tsv)])
    with pytest.raises(ConfigError, match="--data is required to evaluate a teacher or a student"):
        ev.evaluate("toy:0")


def test_max_captions_keeps_the_first_k(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=4, caps_per_image=3)
    data = load_dataset(tsv)
    two = ev.first_captions(data, 2)
    assert two.num_captions == 8 and two.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert two.captions[2:4] == data.captions[3:5]
    res = ev.evaluate("toy:0", str(tsv), num_workers=0, max_captions=2)
    assert res.num_captions == 8
