"""webdataset ``.tar`` input (:mod:`distill.core.data.formats.webdataset`): shards made here from the bundled Flickr8k sample
(24 train images in 4 shards of 6, captions as ``.json`` lists or ``.txt``), cached with the toy
teacher, a few training steps with exact resume, and evaluation."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core.cache.reader import TeacherCache
from distill.core.cache.writer import plan_shards
from distill.pipeline.cache.main import main as cache_main
from distill.core.data.factory import load_dataset
from distill.core.errors import BadSampleError, NoSplitsError
from distill.pipeline.train.log import read_log
from distill.core.data.formats.webdataset import WebDatasetImages, expand_shards, samples_per_shard
from teachers import create_teacher
from tests.helpers.training import TINY_STUDENT

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_flickr8k"
PER_SHARD, SHARDS = 6, 4


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, bad: str | None = None) -> tuple[Path, list]:
    """4 shards ``{000..003}.tar`` of the first 24 sample train images; returns (folder, the source
    dataset). Even samples carry ``.json`` with all captions, odd ones ``.txt`` with the first.
    ``bad="nocaption"`` drops the caption of sample 7."""
    src = load_dataset(SAMPLE, "train").subset(range(PER_SHARD * SHARDS))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(SHARDS):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                key = f"sample{i:05d}"
                _add(tar, f"{key}.jpg", src.image_path(i).read_bytes())
                if bad == "nocaption" and i == 7:
                    continue
                if i % 2 == 0:
                    _add(tar, f"{key}.json", json.dumps({"captions": src.captions_of(i), "id": i}).encode())
                else:
                    _add(tar, f"{key}.txt", src.captions_of(i)[0].encode())
    return folder, src


def expected_captions(src) -> list[str]:
    return [c for i in range(src.num_images) for c in (src.captions_of(i) if i % 2 == 0 else src.captions_of(i)[:1])]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    return make_shards(tmp_path_factory.mktemp("wds") / "shards")


def test_index_is_stable_and_reads_the_right_bytes(shards):
    folder, src = shards
    ds = load_dataset(f"{folder}/{{000..003}}.tar")
    assert isinstance(ds, WebDatasetImages) and (ds.num_images, ds.split) == (24, "all")
    assert ds.images[:2] == ["000.tar/sample00000.jpg", "000.tar/sample00001.jpg"]
    assert ds.images[-1] == "003.tar/sample00023.jpg" and ds.shard_counts == [6] * 4
    assert ds.captions == expected_captions(src)
    for i in (0, 7, 23):
        assert np.array_equal(np.asarray(ds.load_image(i)), np.asarray(src.load_image(i)))
    # a folder of shards and a '::' list index to the same samples (same fingerprint: same cache)
    assert load_dataset(folder).fingerprint() == ds.fingerprint()
    two = load_dataset(f"{folder}/000.tar::{folder}/001.tar")
    assert two.num_images == 12 and two.captions == ds.captions[:len(two.captions)]
    assert [p.name for p in expand_shards(f"{folder}/{{000..003}}.tar")] == [f"{s:03d}.tar" for s in range(4)]
    sub = ds.subset([5, 1])
    assert np.array_equal(np.asarray(sub.load_image(0)), np.asarray(src.load_image(5)))


def test_errors_name_shard_and_sample(tmp_path: Path):
    folder, _ = make_shards(tmp_path / "bad", bad="nocaption")
    with pytest.raises(BadSampleError, match=r"001\.tar:sample00007: no caption"):
        load_dataset(f"{folder}/{{000..003}}.tar")
    ds = load_dataset(f"{folder}/{{000..003}}.tar", on_bad_sample="skip", check_decode=False)
    assert ds.num_images == 23 and len(ds.skipped) == 1 and "sample00007" in ds.skipped[0].where
    assert ds.shard_counts == [6, 5, 6, 6] and samples_per_shard(ds) is None
    with pytest.raises(NoSplitsError, match="has no splits"):
        load_dataset(f"{folder}/{{000..003}}.tar", split="train")
    with pytest.raises(FileNotFoundError, match="004.tar"):
        load_dataset(f"{folder}/{{000..004}}.tar")


def test_cache_shards_follow_tar_shards(shards):
    """Default cache shard size = samples per tar, so the cache shards that rank r of W writes
    (r, r+W, ...) read exactly the tar shards r, r+W, ..."""
    folder, _ = shards
    ds = load_dataset(folder)
    plans = plan_shards(ds.offsets, samples_per_shard(ds))
    for world in (1, 2, 3):
        for rank in range(world):
            tars = {int(ds.members[i, 0]) for p in plans[rank::world] for i in range(*p.image_range)}
            assert tars == set(range(SHARDS)[rank::world])


@pytest.mark.slow
def test_cache_train_resume_evaluate(shards, tmp_path: Path):
    from distill.pipeline import evaluate
    from distill.pipeline.train import main as ts

    folder, src = shards
    data = f"{folder}/{{000..003}}.tar"
    cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", data, "--out", str(tmp_path / "cache"),
                "--num-workers", "0", "--batch-size", "8", "--device", "cpu"])
    cache = TeacherCache(tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["shard_size"] == PER_SHARD and len(manifest["shards"]) == SHARDS
    assert (cache.num_images, cache.num_captions) == (24, len(expected_captions(src)))
    teacher = create_teacher("toy:0").eval()
    tf = teacher.image_transform()
    with torch.no_grad():  # cached row i is the teacher's output on sample i (alignment)
        fresh = teacher.encode_image(torch.stack([tf(src.load_image(i)) for i in (0, 13, 23)])).embed
    torch.testing.assert_close(cache.images(torch.tensor([0, 13, 23])).embed, fresh, atol=2e-3, rtol=0)

    def train(out: Path, resume: str) -> dict:
        sets = [f"student.{k}={v}" for k, v in TINY_STUDENT.items()] + ["train.checkpoint_every=2"]
        return ts.main(["--cache", str(tmp_path / "cache"), "--data", data, "--out", str(out), "--steps", "4",
                        "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu", "--seed", "0",
                        "--resume", resume, *[a for s in sets for a in ("--set", s)]])

    train(tmp_path / "straight", "auto")
    # resume a second run from the straight run's step-2 checkpoint: steps 3-4 must repeat exactly
    train(tmp_path / "resumed", str(tmp_path / "straight" / "checkpoints" / "step_000002.pt"))
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["total"] for r in resumed] == pytest.approx([r["total"] for r in straight[2:]], rel=1e-5)
    assert straight[0]["lr"] == pytest.approx(1e-3)  # default warm-up: 5% of 4 steps = 1 step

    assert evaluate.main(["--model", str(tmp_path / "straight" / "student"), "--data", data, "--num-workers", "0",
                          "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["num_images"], result["split"], result["label"]) == (24, "all", "straight")
    assert 0 < result["metrics"]["rsum"] <= 600
