"""examples/coco.sh on a miniature COCO-2017 layout (``annotations/captions_{train,val}2017.json``
beside ``train2017/`` and ``val2017/``) and the converter it uses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.core.data.factory import load_dataset
from tests.helpers.data import write_jpeg
from tests.helpers.examples import check_outputs, run_script
from tests.helpers.paths import REPO


def mini_coco2017(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """``root/annotations/captions_{train,val}2017.json`` + ``root/{train,val}2017/*.jpg``, 5 captions each
    (image ids descending in the file, to check the converter's id order)."""
    (root / "annotations").mkdir(parents=True)
    for split, n, base in (("train", n_train, 0), ("val", n_val, 100)):
        ids = [base + i for i in range(n)][::-1]
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        anns = [{"id": 10 * i + k, "image_id": i, "caption": f"image {i} caption {k} "} for i in ids for k in range(5)]
        for i in ids:
            write_jpeg(root / f"{split}2017" / f"{i:012d}.jpg", i)
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "annotations" / "captions_train2017.json"


@pytest.mark.slow
def test_converter_splits(tmp_path: Path):
    train = mini_coco2017(tmp_path)
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "coco2017_to_karpathy.py"), str(train),
                           str(train.with_name("captions_val2017.json")), str(out), "--val-images", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "train 6, val 2, test 4 images" in proc.stdout
    val = load_dataset(out, "val", tmp_path)
    assert val.images == ["train2017/000000000006.jpg", "train2017/000000000007.jpg"]  # the last train ids
    test = load_dataset(out, "test", tmp_path)
    assert test.images[0] == "val2017/000000000100.jpg" and test.captions_of(0)[0] == "image 100 caption 0"
    assert load_dataset(out, "train", tmp_path).num_images == 6
    bad = subprocess.run([sys.executable, str(REPO / "examples" / "coco2017_to_karpathy.py"), str(train),
                          str(tmp_path / "missing.json"), str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and f"error: {tmp_path / 'missing.json'}" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_coco2017_end_to_end(tmp_path: Path, tiny_openclip: str, monkeypatch):
    train = mini_coco2017(tmp_path / "coco")
    monkeypatch.setenv("COCO2017_VAL_IMAGES", "2")
    proc = run_script("coco.sh", [str(train), str(tmp_path / "coco"), str(tmp_path / "out")], tmp_path, tiny_openclip)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: train 6 images / 30 captions, val 2 images / 10 captions, test 4 images / 20 captions" in proc.stdout
    check_outputs(tmp_path / "out", tmp_path / "coco", 6, 4, proc.stdout)


@pytest.mark.slow
def test_coco2017_needs_its_folders(tmp_path: Path, tiny_openclip: str):
    train = mini_coco2017(tmp_path / "coco")
    (tmp_path / "coco" / "val2017").rename(tmp_path / "coco" / "v")
    proc = run_script("coco.sh", [str(train), str(tmp_path / "coco"), str(tmp_path / "out")], tmp_path, tiny_openclip)
    assert proc.returncode == 2 and "has no val2017/ folder" in proc.stderr
    train.with_name("captions_val2017.json").unlink()
    proc = run_script("coco.sh", [str(train), str(tmp_path / "coco"), str(tmp_path / "out")], tmp_path, tiny_openclip)
    assert proc.returncode == 2 and "captions_val2017.json not found beside" in proc.stderr
    assert not (tmp_path / "out").exists()
