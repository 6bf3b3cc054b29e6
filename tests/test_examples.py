"""examples/flickr30k.sh and examples/coco.sh end to end on miniature Karpathy-layout copies.

Each script runs in a subprocess from an unrelated working directory with a tiny random-init
open_clip teacher (a model config JSON) and a tiny student, for 3 steps on CPU.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest

from distill.pipeline.evaluate import METRIC_ORDER
from tests.helpers.data import WORDS, write_jpeg
from tests.helpers.examples import check_outputs, run_script
from tests.helpers.paths import REPO

SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 4  # 12 images, 5 captions each


def karpathy_entry(i: int, split: str, filename: str, filepath: str | None) -> dict:
    """One ``images[]`` record of a Karpathy JSON with 5 sentences."""
    rng = np.random.default_rng(100 + i)
    sentences = [{"raw": f"{' '.join(rng.choice(WORDS, size=4))} {i} {k}", "tokens": [], "sentid": 5 * i + k}
                 for k in range(5)]
    entry = {"filename": filename, "imgid": i, "split": split, "sentences": sentences, "sentids": [5 * i + k for k in range(5)]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def mini_flickr30k(root: Path) -> tuple[Path, Path]:
    """``dataset_flickr30k.json`` + ``flickr30k-images/`` with 6 train, 2 val, 4 test images."""
    images = root / "flickr30k-images"
    entries = []
    for i, split in enumerate(SPLITS):
        name = f"{1000 + i}.jpg"
        write_jpeg(images / name, i)
        entries.append(karpathy_entry(i, split, name, None))
    data = root / "dataset_flickr30k.json"
    data.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return data, images


def mini_coco(root: Path) -> tuple[Path, Path]:
    """``dataset_coco.json`` + ``coco/{train2014,val2014}``: train images in train2014; restval,
    val and test images in val2014 (as in the real Karpathy COCO split)."""
    images = root / "coco"
    splits = ["train"] * 4 + ["restval"] * 2 + SPLITS[6:]
    entries = []
    for i, split in enumerate(splits):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        write_jpeg(images / folder / name, i)
        entries.append(karpathy_entry(i, split, name, folder))
    data = root / "dataset_coco.json"
    data.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return data, images


@pytest.mark.slow
def test_flickr30k_end_to_end(tmp_path: Path, tiny_openclip: str):
    _, images = mini_flickr30k(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    # relative paths from an unrelated working directory: the script must not depend on its location
    proc = run_script("flickr30k.sh", ["../data/dataset_flickr30k.json", "../data/flickr30k-images", "../runs/f30k"],
                      tmp_path / "elsewhere", tiny_openclip)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: train 6 images / 30 captions, val 2 images / 10 captions, test 4 images / 20 captions" in proc.stdout
    check_outputs(tmp_path / "runs" / "f30k", images, 6, 4, proc.stdout)


@pytest.mark.slow
def test_coco_end_to_end(tmp_path: Path, tiny_openclip: str):
    data, images = mini_coco(tmp_path)
    proc = run_script("coco.sh", [str(data), str(images), str(tmp_path / "out")], REPO.parent, tiny_openclip)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train 6 images / 30 captions" in proc.stdout  # train + restval
    check_outputs(tmp_path / "out", images, 6, 4, proc.stdout)
    cached = json.loads((tmp_path / "out" / "cache_train" / "manifest.json").read_text())["dataset"]
    assert cached["num_images"] == 6 and cached["root"] == str(images)


@pytest.mark.slow
def test_wrong_paths_fail_fast_with_clear_errors(tmp_path: Path, tiny_openclip: str):
    data, images = mini_flickr30k(tmp_path / "data")
    out = tmp_path / "out"
    cases = [
        ("flickr30k.sh", [str(tmp_path / "nope.json"), str(images), str(out)], f"Karpathy JSON not found: {tmp_path / 'nope.json'}"),
        ("flickr30k.sh", [str(data), str(tmp_path / "noimg"), str(out)], f"image folder not found: {tmp_path / 'noimg'}"),
        # an existing folder that is not the image folder: the first missing image is named
        ("flickr30k.sh", [str(data), str(tmp_path), str(out)], f"image file not found: {tmp_path / '1000.jpg'}"),
        ("coco.sh", [str(data), str(images), str(out)], f"{images} has no train2014/ folder"),
        ("flickr30k.sh", [str(data), str(images)], "usage: flickr30k.sh DATASET_JSON IMAGES_ROOT OUT_DIR"),
    ]
    for script, args, message in cases:
        proc = run_script(script, args, tmp_path, tiny_openclip)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was written before the checks


@pytest.mark.slow
def test_teacher_needing_a_download_fails_with_its_error(tmp_path: Path):
    from teachers.openclip import _cached_weights

    if _cached_weights(open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")):
        pytest.skip("the default teacher's weights are in the local open_clip cache")
    data, images = mini_flickr30k(tmp_path / "data")
    proc = run_script("flickr30k.sh", [str(data), str(images), str(tmp_path / "out")], tmp_path,
                      "openclip:ViT-B-32:laion2b_s34b_b79k")
    assert proc.returncode != 0
    assert "not in the local cache and would need a download" in proc.stderr


def test_compare_table_and_errors(tmp_path: Path, capsys):
    spec = importlib.util.spec_from_file_location("examples_compare", REPO / "examples" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    metrics = dict(zip(METRIC_ORDER, [40.0, 70.0, 80.0, 30.0, 60.0, 70.0, 350.0]))
    (tmp_path / "teacher.json").write_text(json.dumps({"metrics": metrics, "num_images": 1000}))
    (tmp_path / "student.json").write_text(json.dumps({"metrics": {k: v / 2 for k, v in metrics.items()},
                                                       "num_images": 1000}))
    table = compare.main([str(tmp_path / "teacher.json"), str(tmp_path / "student.json")]).splitlines()
    assert table[0].split() == ["model", *METRIC_ORDER, "rsum", "%", "images"]
    assert table[2].split() == ["teacher", "40.00", "70.00", "80.00", "30.00", "60.00", "70.00", "350.00", "100.0", "1000"]
    assert table[3].split() == ["student", "20.00", "35.00", "40.00", "15.00", "30.00", "35.00", "175.00", "50.0", "1000"]
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {"rsum": 1.0}}))
    for name, message in (("bad.json", "is not a distill.evaluate result (missing metrics ['i2t_R@1'"),
                          ("missing.json", "cannot read evaluation result")):
        with pytest.raises(SystemExit) as e:
            compare.main([str(tmp_path / "teacher.json"), str(tmp_path / name)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and str(tmp_path / name) in err
