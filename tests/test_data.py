"""Dataset loaders: CSV/TSV, Karpathy JSON, COCO JSON, Flickr8k; bad-input errors and skip mode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.core.data.factory import load_dataset
from distill.core.errors import BadSampleError
from tests.helpers.data import make_tiny_dataset


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


# -- malformed files and rows (issue 13.5) -----------------------------------------------------
def test_non_utf8_row_names_file_and_row_and_is_skippable(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=3, caps_per_image=1)
    tsv.write_bytes(b"image\tcaption\nimages/img000.jpg\tzero\nimages/img001.jpg\tcaf\xe9 latin-1\n"
                    b"images/img002.jpg\ttwo\n")
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: row is not valid UTF-8"):
        load_dataset(tsv)
    ds = load_dataset(tsv, on_bad_sample="skip")
    assert ds.captions == ["zero", "two"] and [s.where for s in ds.skipped] == [f"{tsv}:3"]


def test_flickr8k_layout_non_utf8_line(tmp_path):
    make_tiny_dataset(tmp_path / "f", n_images=2, caps_per_image=1)
    (tmp_path / "f" / "splits").mkdir()
    (tmp_path / "f" / "captions.tsv").write_bytes(b"image\tcaption_id\tcaption\nimg000.jpg\t0\tfine\n"
                                                  b"img001.jpg\t0\tbad \xff byte\nimg001.jpg\t1\tgood\n")
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: line is not valid UTF-8"):
        load_dataset(tmp_path / "f")
    assert load_dataset(tmp_path / "f", on_bad_sample="skip").captions == ["fine", "good"]


def test_nul_byte_in_path(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    write_tsv(tsv, ["images/img000.jpg\tfine", "images/img001.jpg\x00.png\tnul"])
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: image path .* contains a NUL byte"):
        load_dataset(tsv)
    assert load_dataset(tsv, on_bad_sample="skip").images == ["images/img000.jpg"]


def test_over_long_csv_field(tmp_path):
    make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    csv_path = tmp_path / "d" / "data.csv"
    csv_path.write_text("image,caption\nimages/img000.jpg,fine\n"
                        f'images/img001.jpg,"{"x" * 200_000}"\nimages/img001.jpg,short\n')
    with pytest.raises(BadSampleError, match=r"data\.csv:3: malformed row: field larger than field limit"):
        load_dataset(csv_path)
    ds = load_dataset(csv_path, on_bad_sample="skip")
    assert ds.captions == ["fine", "short"] and len(ds.skipped) == 1


@pytest.mark.parametrize("entry, message", [
    ({"filepath": "images", "split": "train", "sentences": [{"raw": "a"}]}, r"images\[1\]: 'filename' must be a non-empty string, got None"),
    ({"filename": 7, "sentences": [{"raw": "a"}]}, r"images\[1\]: 'filename' must be a non-empty string, got 7"),
    ("img001.jpg", r"images\[1\]: expected an object, got str"),
    ({"filename": "img001.jpg", "filepath": "images", "sentences": ["a"]}, r"images\[1\]\.sentences\[0\]: expected an object"),
    ({"filename": "img001.jpg", "filepath": "images", "sentences": [{"raw": 5}]}, r"images\[1\]\.sentences\[0\]: caption must be a string"),
])
def test_karpathy_bad_entries_are_rows(tmp_path, entry, message):
    make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    path = tmp_path / "d" / "dataset_x.json"
    path.write_text(json.dumps({"images": [
        {"filepath": "images", "filename": "img000.jpg", "sentences": [{"raw": "ok"}]}, entry]}))
    with pytest.raises(BadSampleError, match=message):
        load_dataset(path)
    ds = load_dataset(path, on_bad_sample="skip")
    assert ds.captions == ["ok"] and len(ds.skipped) == 1


def test_broken_json_is_a_file_error_with_position(tmp_path):
    path = tmp_path / "dataset_x.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n  }\n]}')
    for mode in ("error", "skip"):
        with pytest.raises(BadSampleError, match=r"dataset_x\.json:3:3: broken JSON"):
            load_dataset(path, on_bad_sample=mode)
    path.write_bytes(b'{"images": ["\xff"]}')
    with pytest.raises(BadSampleError, match=r"dataset_x\.json: byte 13: not valid UTF-8"):
        load_dataset(path)


def test_spellings_of_one_file_are_one_image(tmp_path):
    tsv = make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
    write_tsv(tsv, ["images/img000.jpg\ta", "./images/img000.jpg\tb", "images//img000.jpg\tc",
                    "images/../images/img000.jpg\td", "images/img001.jpg\te"])
    ds = load_dataset(tsv)
    assert ds.images == ["images/img000.jpg", "images/img001.jpg"] and ds.captions == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(ds.offsets, [0, 4, 5])


def test_coco_duplicate_image_id(tmp_path):
    make_tiny_dataset(tmp_path / "d", n_images=3, caps_per_image=1)
    path = tmp_path / "d" / "captions_x.json"
    images = [{"id": 1, "file_name": "img000.jpg"}, {"id": 2, "file_name": "img001.jpg"}, {"id": 1, "file_name": "img002.jpg"}]
    anns = [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    root = tmp_path / "d" / "images"
    with pytest.raises(BadSampleError, match=r"images\[2\]: image id 1 is declared twice, as images\[0\] \('img000\.jpg'\) "
                                             r"and here \('img002\.jpg'\)"):
        load_dataset(path, images_root=root)
    ds = load_dataset(path, images_root=root, on_bad_sample="skip")  # the ambiguous id is dropped, counted
    assert ds.images == ["img001.jpg"] and len(ds.skipped) == 2
    images[2]["file_name"] = "./img000.jpg"  # the same file declared twice: one image
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    ds = load_dataset(path, images_root=root)
    assert ds.images == ["img000.jpg", "img001.jpg"] and ds.captions == ["one", "two"]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    tsv = make_tiny_dataset(tmp_path / "d", n_images=1, caps_per_image=1)
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "d" / "images" / "g16.png")
    write_tsv(tsv, ["images/g16.png\tgray"])
    got = np.asarray(load_dataset(tsv).load_image(0))
    assert got.shape == (64, 64, 3) and (got == 255).mean() < 0.01
    np.testing.assert_array_equal(got[..., 0], (ramp >> 8).astype(np.uint8))


def _png_with_short_pixel_data(path, size=64):
    """A PNG whose chunks and zlib stream are intact (IHDR, IDAT, IEND) but whose pixel data stops
    half-way: PIL decodes it with the missing rows zero-filled."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    pixels = (np.random.default_rng(1).random((size, size * 3)) * 255).astype(np.uint8)
    rows = b"".join(b"\0" + r.tobytes() for r in pixels)
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows[: len(rows) // 2]))
                     + chunk(b"IEND", b""))


def test_truncated_images_are_refused(tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    tsv = make_tiny_dataset(tmp_path / "d", n_images=1, caps_per_image=1)
    images = tmp_path / "d" / "images"
    _png_with_short_pixel_data(images / "short.png")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(images / "full.png")
    data = (images / "full.png").read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    write_tsv(tsv, ["images/full.png\tfine", "images/short.png\tshort", "images/cut.png\tcut"])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might set it
    ds = load_dataset(tsv)
    assert ds.load_image(0).size == (64, 64)
    with pytest.raises(BadSampleError, match=r"captions\.tsv:3: cannot decode image .*short\.png: truncated PNG"):
        ds.load_image(1)
    with pytest.raises(BadSampleError, match=r"captions\.tsv:4: cannot decode image .*cut\.png"):
        ds.load_image(2)
    skipped = load_dataset(tsv, on_bad_sample="skip")
    assert skipped.images == ["images/full.png"] and len(skipped.skipped) == 2


def test_stats_digest_sees_a_replaced_file(tmp_path):
    import os

    tsv = make_tiny_dataset(tmp_path / "d", n_images=3, caps_per_image=1)
    ds = load_dataset(tsv)
    whole, first = ds.stats_digest(), ds.stats_digest(0, 1)
    img = tmp_path / "d" / "images" / "img002.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert ds.stats_digest() != whole and ds.stats_digest(0, 1) == first
    assert load_dataset(tsv).fingerprint() == ds.fingerprint()  # content fingerprint: names + captions
