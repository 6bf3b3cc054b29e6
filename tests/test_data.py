"""Dataset loaders: CSV/TSV, Karpathy JSON, COCO JSON, Flickr8k; bad-input errors and skip mode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.data import BadSampleError, load_dataset
from tests.conftest import make_tiny_dataset


def write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("image\tcaption\n" + "\n".join(rows) + "\n")
    return path


def test_tsv_groups_captions_by_image(tiny_tsv):
    ds = load_dataset(tiny_tsv)
    assert (ds.num_images, ds.num_captions, ds.name, ds.split) == (12, 24, "captions", "all")
    np.testing.assert_array_equal(ds.offsets, np.arange(0, 26, 2))
    assert ds.images[3] == "images/img003.jpg" and ds.image_sources[3] == f"{tiny_tsv}:8"
    assert ds.captions_of(3)[1].endswith("3 1")
    assert ds.load_image(3).size == (40, 40)
    sub = ds.subset([5, 1])
    assert sub.images == ["images/img005.jpg", "images/img001.jpg"] and sub.captions == ds.captions_of(5) + ds.captions_of(1)


def test_fingerprint_tracks_content_not_location(tmp_path):
    a = load_dataset(make_tiny_dataset(tmp_path / "a"))
    b = load_dataset(make_tiny_dataset(tmp_path / "b"))
    assert a.fingerprint() == b.fingerprint()
    tsv = tmp_path / "b" / "captions.tsv"
    tsv.write_text(tsv.read_text().replace("0 1\n", "0 1 changed\n", 1))
    assert load_dataset(tsv).fingerprint() != a.fingerprint()


def test_tsv_quotes_and_blank_lines(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    write_tsv(tsv, ['images/img000.jpg\t"Quoted" start of a caption', "", 'images/img001.jpg\ta 3" nail'])
    ds = load_dataset(tsv)
    assert ds.captions == ['"Quoted" start of a caption', 'a 3" nail']


@pytest.mark.parametrize("row, message", [
    ("images/nope.jpg\ta caption", r"captions\.tsv:3: image file not found: .*nope\.jpg"),
    ("images/img001.jpg\t   ", r"captions\.tsv:3: empty caption for image 'images/img001\.jpg'"),
    ("../outside.jpg\ta caption", r"captions\.tsv:3: image path '\.\./outside\.jpg' escapes the data root"),
    ("images/../../outside.jpg\tsneaky", r"captions\.tsv:3: .* escapes the data root"),
    ("/etc/passwd\ta caption", r"captions\.tsv:3: image path '/etc/passwd' is absolute"),
    ("only-one-column", r"captions\.tsv:3: expected at least 2 columns, got 1"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, message):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    (tmp_path / "outside.jpg").write_bytes((tmp_path / "d" / "images" / "img000.jpg").read_bytes())
    write_tsv(tsv, ["images/img000.jpg\tfine caption", row])
    with pytest.raises(BadSampleError, match=message):
        load_dataset(tsv)


def test_corrupt_jpeg_names_file_and_row(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=3, caps_per_image=1)
    good = (tmp_path / "d" / "images" / "img001.jpg").read_bytes()
    (tmp_path / "d" / "images" / "img001.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    ds = load_dataset(tsv)  # error mode only checks that the file exists ...
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: cannot decode image .*img001\.jpg"):
        ds.load_image(1)  # ... decoding fails later, naming the row
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: cannot decode image .*img001\.jpg"):
        load_dataset(tsv, check_decode=True)


def test_skip_mode_counts_and_lists_bad_rows(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=4, caps_per_image=1)
    (tmp_path / "d" / "images" / "img002.jpg").write_bytes(b"garbage")
    write_tsv(tsv, ["images/img000.jpg\tzero", "images/missing.jpg\tgone", "images/img001.jpg\t",
                    "images/img002.jpg\tcorrupt", "images/img001.jpg\tone", "../x.jpg\tescape",
                    "images/img002.jpg\tcorrupt again", "images/img003.jpg\tthree", "short"])
    ds = load_dataset(tsv, on_bad_sample="skip")
    assert ds.images == ["images/img000.jpg", "images/img001.jpg", "images/img003.jpg"]
    assert ds.captions == ["zero", "one", "three"]
    assert [s.where for s in ds.skipped] == [f"{tsv}:{n}" for n in (3, 4, 5, 7, 8, 10)]
    reasons = [s.reason for s in ds.skipped]
    assert "not found" in reasons[0] and "empty caption" in reasons[1] and "cannot decode" in reasons[2]
    assert "escapes" in reasons[3] and "rejected on an earlier row" in reasons[4] and "columns" in reasons[5]
    assert ds.describe()["skipped"] == 6


def test_karpathy_json(tmp_path):
    make_tiny_dataset(tmp_path / "d", n_images=4, caps_per_image=1)
    data = {"dataset": "tinyk", "images": [
        {"filepath": "images", "filename": "img000.jpg", "split": "train", "sentences": [{"raw": "a"}, {"raw": "b"}]},
        {"filepath": "images", "filename": "img001.jpg", "split": "restval", "sentences": [{"tokens": ["c", "d"]}]},
        {"filepath": "images", "filename": "img002.jpg", "split": "val", "sentences": [{"raw": "e"}]},
        {"filepath": "images", "filename": "img003.jpg", "split": "test", "sentences": [{"raw": "f"}, {"raw": "g"}]},
    ]}
    path = tmp_path / "d" / "dataset_tiny.json"
    path.write_text(json.dumps(data))
    train = load_dataset(path, split="train")
    assert (train.name, train.images, train.captions) == ("tinyk", ["images/img000.jpg", "images/img001.jpg"], ["a", "b", "c d"])
    assert load_dataset(path, split="dev").captions == ["e"]
    test = load_dataset(path, split="test")
    np.testing.assert_array_equal(test.offsets, [0, 2])
    assert load_dataset(path).num_images == 4
    data["images"][2]["sentences"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(BadSampleError, match=r"dataset_tiny\.json: images\[2\] \(images/img002\.jpg\): no sentences"):
        load_dataset(path)
    assert [s.where for s in load_dataset(path, on_bad_sample="skip").skipped] == [f"{path}: images[2]"]


def test_coco_captions_json(tmp_path):
    make_tiny_dataset(tmp_path / "d", n_images=3, caps_per_image=1)
    data = {"images": [{"id": 7, "file_name": "img002.jpg"}, {"id": 3, "file_name": "img000.jpg"}],
            "annotations": [{"image_id": 3, "caption": "x0"}, {"image_id": 7, "caption": "y0"},
                            {"image_id": 3, "caption": "x1"}, {"image_id": 7, "caption": " y1 "}]}
    path = tmp_path / "d" / "captions_val.json"
    path.write_text(json.dumps(data))
    ds = load_dataset(path, images_root=tmp_path / "d" / "images")
    assert ds.images == ["img002.jpg", "img000.jpg"] and ds.captions == ["y0", "y1", "x0", "x1"]
    assert ds.image_sources == [f"{path}: annotations[1]", f"{path}: annotations[0]"]
    data["annotations"].append({"image_id": 99, "caption": "orphan"})
    path.write_text(json.dumps(data))
    with pytest.raises(BadSampleError, match=r"captions_val\.json: annotations\[4\]: unknown image_id 99"):
        load_dataset(path, images_root=tmp_path / "d" / "images")


def test_unsupported_inputs(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither Karpathy"):
        load_dataset(tmp_path / "x.json")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match="unsupported dataset format"):
        load_dataset(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_dataset(tmp_path / "missing.tsv")


def test_flickr8k_split_sizes(flickr8k):
    sizes = {}
    for split in ("train", "val", "test"):
        ds = load_dataset(flickr8k, split=split)
        assert ds.name == "flickr8k" and ds.num_captions == 5 * ds.num_images
        sizes[split] = ds.num_images
        assert ds.image_path(0).is_file()
    assert sizes == {"train": 6000, "val": 1000, "test": 1000}
    assert load_dataset(flickr8k, split="dev").images == load_dataset(flickr8k, split="val").images
