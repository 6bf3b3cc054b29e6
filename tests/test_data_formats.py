"""Dataset splits (unknown names and formats without splits are errors), symlinked image folders,
the ``--images-root`` hint and the examples' COCO-2017 converter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.core.errors import BadSampleError, ConfigError, NoSplitsError, SplitError
from distill.core.data.factory import load_dataset
from tests.helpers.data import make_tiny_dataset
from tests.helpers.registry import registered

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_flickr8k"


def coco_json(path: Path, images: list[str]) -> Path:
    data = {"images": [{"id": i, "file_name": f} for i, f in enumerate(images)],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption {i}"} for i in range(len(images))]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_tiny_dataset(tmp_path, n_images=4, caps_per_image=1)
    return tmp_path


def test_coco_without_split_in_its_name_refuses_any_split(data: Path):
    path = coco_json(data / "captions.json", [f"images/img00{i}.jpg" for i in range(4)])
    assert load_dataset(path).num_images == 4 and load_dataset(path, "all").split == "all"
    for split in ("bogus", "train", "test"):
        with pytest.raises(NoSplitsError, match=rf"captions\.json: this dataset has no splits, so --split '{split}'"):
            load_dataset(path, split)
    assert issubclass(NoSplitsError, SplitError) and issubclass(SplitError, ConfigError)


def test_coco_2017_file_name_is_its_split(data: Path):
    path = coco_json(data / "captions_val2017.json", [f"images/img00{i}.jpg" for i in range(4)])
    assert load_dataset(path, "val").num_images == 4 and load_dataset(path, "dev").num_images == 4
    with pytest.raises(SplitError, match=r"unknown split 'train'; known splits: val"):
        load_dataset(path, "train")


def test_unknown_split_lists_the_known_ones(data: Path):
    tsv = data / "with_split.tsv"
    tsv.write_text("image\tcaption\tsplit\nimages/img000.jpg\ta\ttrain\nimages/img001.jpg\tb\ttest\n")
    assert load_dataset(tsv, "train").images == ["images/img000.jpg"]
    with pytest.raises(SplitError, match=r"unknown split 'tset'; known splits: test, train"):
        load_dataset(tsv, "tset")
    with pytest.raises(NoSplitsError):  # a TSV without a split column
        load_dataset(data / "captions.tsv", "train")
    karpathy = data / "dataset_x.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "images/img000.jpg", "split": "restval",
                                                "sentences": [{"raw": "a"}]}]}))
    assert load_dataset(karpathy, "train").num_images == 1  # restval belongs to train
    with pytest.raises(SplitError, match=r"unknown split 'bogus'; known splits: restval"):
        load_dataset(karpathy, "bogus")
    with pytest.raises(SplitError, match=r"unknown split 'bogus'; known splits: test, train"):
        load_dataset(SAMPLE, "bogus")


def test_evaluate_default_split_on_a_file_without_splits(data: Path, capsys):
    from distill.pipeline.evaluate import evaluate, main

    path = coco_json(data / "captions.json", [f"images/img00{i}.jpg" for i in range(4)])
    out = data / "eval.json"
    assert main(["--model", "toy:0", "--data", str(path), "--num-workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "all" and result["num_images"] == 4 and result["label"] == "toy:0"
    assert "has no splits; evaluating all its rows" in capsys.readouterr().err
    with pytest.raises(NoSplitsError):
        main(["--model", "toy:0", "--data", str(path), "--split", "test", "--device", "cpu"])
    assert evaluate("toy:0", str(path), num_workers=0).split == "all"


def test_symlinked_image_folder_is_followed_and_dotdot_refused(tmp_path: Path):
    make_tiny_dataset(tmp_path / "store", n_images=2, caps_per_image=1)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "store" / "images", root / "images")  # a folder link pointing outside the root
    (root / "captions.tsv").write_text("image\tcaption\nimages/img000.jpg\ta\nimages/img001.jpg\tb\n")
    ds = load_dataset(root / "captions.tsv")
    assert ds.images == ["images/img000.jpg", "images/img001.jpg"] and ds.load_image(1).size == (40, 40)
    (root / "bad.tsv").write_text("image\tcaption\nimages/../../store/images/img000.jpg\ta\n")
    with pytest.raises(BadSampleError, match=r"bad\.tsv:2: image path .* escapes the data root .* through '\.\.' "
                                             r"\(symlinks inside the root are followed"):
        load_dataset(root / "bad.tsv")


def test_missing_image_hints_at_images_root(data: Path):
    (data / "annotations").mkdir()  # the COCO layout: captions in annotations/, images elsewhere
    path = coco_json(data / "annotations" / "captions.json", ["img000.jpg"])
    with pytest.raises(BadSampleError, match=r"image file not found: .*annotations/img000\.jpg \(image paths are "
                                             r"relative to .*annotations; pass --images-root DIR"):
        load_dataset(path)
    assert load_dataset(path, images_root=data / "images").num_images == 1


def test_formats_are_registered_readers_asked_in_a_fixed_order(data: Path):
    from distill.core.data.factory import create_reader, reader_classes
    from distill.core.data.formats.base import DatasetReader
    from distill.core.registry import DATASET_FORMATS

    builtin = [c for c in reader_classes() if c.__module__.startswith("distill.core.data.formats.")]
    assert [DATASET_FORMATS.get(n) for n in ("webdataset", "flickr8k", "csv", "karpathy", "coco")] == builtin
    assert type(create_reader(data)).__name__ == "CsvReader"  # a folder with captions.tsv
    assert type(create_reader(SAMPLE)).__name__ == "Flickr8kReader"
    assert type(create_reader(coco_json(data / "c.json", ["images/img000.jpg"]))).__name__ == "CocoCaptionsReader"
    assert type(create_reader(data / "captions.tsv", format="csv")).__name__ == "CsvReader"

    class LinesReader(DatasetReader):
        """``image<TAB>caption`` lines in a ``.lines`` file: a format added the way a plugin adds one."""
        label, suffixes = "lines file", (".lines",)

        @classmethod
        def accepts(cls, source):
            return source.is_file and source.suffix == ".lines"

        def read(self):
            from distill.core.data.dataset import assemble

            path = self.source.path
            rows = [(*line.split("\t", 1), f"{path}:{n}")
                    for n, line in enumerate(path.read_text().splitlines(), start=1)]
            return assemble(self.root(), rows, path.stem, self.split or "all", self.on_bad_sample, self.check_decode)

    lines = data / "two.lines"
    lines.write_text("images/img000.jpg\ta dog\nimages/img001.jpg\ta cat\n")
    with pytest.raises(ValueError, match=r"unsupported dataset format '\.lines'"):
        load_dataset(lines)
    with registered(DATASET_FORMATS, "test_lines", LinesReader):
        assert reader_classes()[-1] is LinesReader  # priority 100: asked after the built-in formats
        ds = load_dataset(lines)
        assert ds.images == ["images/img000.jpg", "images/img001.jpg"] and ds.captions == ["a dog", "a cat"]
    assert "test_lines" not in DATASET_FORMATS.names()
