"""Nothing silently wrong (issue 22): bad inputs and faults that used to give a silent wrong result,
lose data or print a traceback. Each case is refused with ONE ``error: ...`` line naming the file,
row or flag (exit status 2 through :func:`distill.pipeline.cli.run_cli`), before anything already
written is touched.

    run folder     log kept but every checkpoint deleted; a second writer; --out naming a file
    resume         a rebuilt cache with other storage settings (tokens, views, pixels, dtype)
    cache          a flipped bit in offsets.npy / a small array; a wrong checksum in the manifest
    data           an image listed twice in a split file; --images-root on a Flickr8k folder; a BOM
    flags          0 read as "default" (quickstart --image-layers 0, train_lit --max-images 0)
    Ctrl-C         one line and exit 130
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from distill.core.lock import LOCK_NAME
from distill.pipeline.cli import run_cli
from distill.pipeline.train import main as ts
from distill.pipeline.train.log import read_log
from tests.helpers.procs import unused_pid
from tests.helpers.training import train_args


def one_error_line(capsys) -> str:
    """The only non-empty stderr line that starts with ``error:`` (no traceback anywhere)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def finished_run(tiny, tmp_path) -> tuple[Path, Path, Path]:
    """(tsv, cache, run folder) of a finished 3-step run."""
    tsv, cache = tiny
    out = tmp_path / "run"
    assert ts.main(train_args(cache, tsv, out, 3)) == 0
    return tsv, cache, out


# -- run folder -------------------------------------------------------------------------------------
def test_resume_auto_refuses_a_log_without_any_checkpoint(finished_run, capsys):
    tsv, cache, out = finished_run
    shutil.rmtree(out / "checkpoints")
    log = (out / "train_log.jsonl").read_bytes()
    assert run_cli(ts.main, train_args(cache, tsv, out, 5, "--resume", "auto")) == 2
    line = one_error_line(capsys)
    assert f"--resume auto: {out} holds a training log" in line and "--overwrite" in line and "remove the log" in line
    assert (out / "train_log.jsonl").read_bytes() == log  # nothing rewritten
    (out / "checkpoints").mkdir()  # an empty checkpoint folder is no better
    assert run_cli(ts.main, train_args(cache, tsv, out, 5, "--resume", "auto")) == 2
    assert ts.train_from_argv(train_args(cache, tsv, out, 2, "--overwrite")).steps == 2  # the way out


def test_a_second_writer_of_a_live_run_folder_is_refused(finished_run, capsys):
    tsv, cache, out = finished_run
    log = (out / "train_log.jsonl").read_bytes()
    other = os.getppid()  # a live process of this host, as if it were training into OUT right now
    (out / LOCK_NAME).write_text(json.dumps({"pid": other, "host": socket.gethostname(), "started": "x"}))
    for extra in (["--resume", "auto"], ["--overwrite"]):
        assert run_cli(ts.main, train_args(cache, tsv, out, 5, *extra)) == 2
        line = one_error_line(capsys)
        assert f"{out} is being written by process {other}" in line and LOCK_NAME in line
    assert (out / "train_log.jsonl").read_bytes() == log and (out / "checkpoints" / "latest.pt").is_file()


def test_a_dead_writers_run_lock_is_taken_over_and_released(finished_run, capsys):
    tsv, cache, out = finished_run
    assert not (out / LOCK_NAME).exists()  # released after the run
    dead = unused_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    assert ts.train_from_argv(train_args(cache, tsv, out, 5, "--resume", "auto")).steps == 5
    assert f"taking over stale lock {out / LOCK_NAME} of process {dead}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]


def test_train_student_out_naming_a_file_is_one_line(tiny, tmp_path, capsys):
    tsv, cache = tiny
    f = tmp_path / "afile"
    f.write_text("keep me")
    for out in (f, f / "run"):
        assert run_cli(ts.main, train_args(cache, tsv, out, 2)) == 2
        assert one_error_line(capsys).startswith(f"error: --out {out} ")
    assert f.read_text() == "keep me"


def test_a_refused_first_run_leaves_no_folder(tiny, tmp_path, capsys):
    tsv, _ = tiny
    out = tmp_path / "run"
    assert run_cli(ts.main, train_args(tmp_path / "nocache", tsv, out, 2)) == 2
    one_error_line(capsys)
    assert not out.exists()


# -- resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, named", [
    (["--image-tokens", "grid:2"], 'storage.image_tokens="full"'),
    (["--views", "3"], "views.count=2"),
    (["--dtype", "int8"], 'storage.dtype="fp16"'),
    (["--pixels", "32"], "storage.pixels=absent"),
], ids=["tokens", "views", "dtype", "pixels"])
def test_resume_on_a_cache_rebuilt_with_other_storage_is_refused(finished_run, tmp_path, capsys, extra, named):
    from distill.pipeline.cache.main import main as cache_main

    tsv, cache, out = finished_run
    rebuilt = tmp_path / "rebuilt"
    assert cache_main(["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--data", str(tsv), "--out",
                       str(rebuilt), "--num-workers", "0", "--batch-size", "8", "--device", "cpu",
                       *(["--views", "2"] if "--views" not in extra else []), *extra]) == 0
    capsys.readouterr()
    assert run_cli(ts.main, train_args(rebuilt, tsv, out, 5, "--resume", "auto")) == 2
    line = one_error_line(capsys)
    assert f"the checkpoint was trained on a cache with {named}" in line and f"but {rebuilt} has" in line
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_a_checkpoint_without_cache_settings_resumes_with_a_warning(finished_run, capsys):
    import torch

    from distill.core import checkpoint as ck

    tsv, cache, out = finished_run
    for p in (out / "checkpoints").glob("*.pt"):  # as written before the settings were recorded
        state = torch.load(p, weights_only=True)
        del state["source"]["cache_settings"]
        state[ck.CHECKSUM_KEY] = ck.checksum(state)
        torch.save(state, p)
    capsys.readouterr()
    assert ts.train_from_argv(train_args(cache, tsv, out, 5, "--resume", "auto")).steps == 5
    assert "predates the record of its cache's storage settings" in capsys.readouterr().err


# -- cache integrity by default -------------------------------------------------------------------
def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def cache_copy(tiny, tmp_path) -> Path:
    """A private copy of the tiny cache (12 images, 2 views, lazy by default) to damage."""
    out = tmp_path / "cache"
    shutil.copytree(tiny[1], out)
    return out


@pytest.mark.parametrize("verify", ["auto", "size", "lazy"])
def test_a_flipped_bit_in_offsets_is_caught_at_open(cache_copy, verify):
    from distill.core.cache import TeacherCache
    from distill.core.errors import CacheCorruptError

    offsets = cache_copy / "offsets.npy"
    _flip_byte(offsets, offsets.stat().st_size - 8 * 6)  # offsets[7]: a caption moves to another image
    with pytest.raises(CacheCorruptError, match=r"offsets\.npy: sha256 mismatch"):
        TeacherCache(cache_copy, verify=verify)


@pytest.mark.parametrize("array", ["view_params", "text_mask", "image_embed"])
def test_a_flipped_bit_in_a_small_array_is_caught_at_open_in_size_mode(cache_copy, array):
    from distill.core.cache import TeacherCache
    from distill.core.errors import CacheCorruptError

    _flip_byte(cache_copy / "shards" / "00000" / f"{array}.npy", -3)
    with pytest.raises(CacheCorruptError, match=rf"shards/00000/{array}\.npy: sha256 mismatch"):
        TeacherCache(cache_copy, verify="size")


def test_an_edited_checksum_in_the_manifest_is_caught(cache_copy, capsys):
    from distill.core.cache import TeacherCache
    from distill.core.errors import CacheCorruptError, ManifestError
    from tests.helpers.caches import edit_manifest

    path = cache_copy / "manifest.json"
    m = json.loads(path.read_text())
    m["offsets"]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"manifest\.json: content does not match its manifest_sha256"):
        TeacherCache(cache_copy)
    assert run_cli(ts.main, ["--cache", str(cache_copy), "--data", "x", "--device", "cpu"]) == 2
    assert "manifest_sha256" in one_error_line(capsys)
    edit_manifest(cache_copy, lambda m: m["offsets"].update(sha256="0" * 64))  # checksum recomputed too
    with pytest.raises(CacheCorruptError, match=r"offsets\.npy: sha256 mismatch"):
        TeacherCache(cache_copy)  # the offsets file itself no longer matches


def test_a_manifest_without_a_checksum_is_read_with_one_warning(cache_copy, capsys):
    from distill.core.cache import TeacherCache
    from distill.core.cache.schema import MANIFEST_CHECKSUM

    path = cache_copy / "manifest.json"
    m = json.loads(path.read_text())
    del m[MANIFEST_CHECKSUM]  # written before manifest checksums
    path.write_text(json.dumps(m))
    capsys.readouterr()
    assert TeacherCache(cache_copy).num_images == 12 and TeacherCache(cache_copy).num_images == 12
    err = capsys.readouterr().err
    assert err.count(f"warning: {path} carries no {MANIFEST_CHECKSUM}") == 1 and "rerun cache_teacher" in err


# -- data -------------------------------------------------------------------------------------------
def _flickr8k(root: Path, train: list[str], bom: bool = False) -> Path:
    """A Flickr8k-layout folder of 4 tiny images, 2 captions each, and ``splits/train.txt`` = ``train``."""
    from tests.helpers.data import make_tiny_dataset

    make_tiny_dataset(root, n_images=4, caps_per_image=1)
    lines = ["image\tcaption_id\tcaption"] + [f"img{i:03d}.jpg\t{k}\tcaption {i} {k}" for i in range(4) for k in range(2)]
    (root / "captions.tsv").write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text(("\ufeff" if bom else "") + "\n".join(train) + "\n", encoding="utf-8")
    return root


CACHE_ARGS = ["--teacher", "toy:0", "--plugin", "tests.helpers.toy_teachers", "--num-workers", "0", "--device", "cpu",
              "--split", "train"]


def test_an_image_listed_twice_in_a_split_file_is_refused_naming_the_row(tmp_path, capsys):
    from distill.core.data.factory import load_dataset
    from distill.core.errors import BadSampleError
    from distill.pipeline.cache.main import main as cache_main

    folder = _flickr8k(tmp_path / "f", ["img000.jpg", "img001.jpg", "img000.jpg", "img002.jpg"])
    sf = folder / "splits" / "train.txt"
    with pytest.raises(BadSampleError, match=rf"{sf}:3: image img000\.jpg is listed twice \(first at {sf}:1\)"):
        load_dataset(folder, "train")
    assert run_cli(cache_main, [*CACHE_ARGS, "--data", str(folder), "--out", str(tmp_path / "c")]) == 2
    assert f"{sf}:3: image img000.jpg is listed twice" in one_error_line(capsys)
    ds = load_dataset(folder, "train", on_bad_sample="skip")  # skipped only when asked, and counted
    assert ds.num_images == 3 and ds.num_captions == 6 and [s.where for s in ds.skipped] == [f"{sf}:3"]


def test_images_root_on_a_flickr8k_folder_is_refused(tmp_path, capsys):
    from distill.pipeline.cache.main import main as cache_main

    folder = _flickr8k(tmp_path / "f", ["img000.jpg", "img001.jpg"])
    argv = [*CACHE_ARGS, "--data", str(folder), "--images-root", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "c")]
    assert run_cli(cache_main, argv) == 2
    assert one_error_line(capsys) == (f"error: {folder}: --images-root does not apply to a Flickr8k folder (its images "
                                      f"are {folder / 'images'}); link or move the images there, or pass a CSV/TSV file")
    assert not (tmp_path / "c").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    from distill.core.data.factory import load_dataset
    from tests.helpers.data import make_tiny_dataset

    ds = load_dataset(_flickr8k(tmp_path / "f", ["img000.jpg", "img001.jpg"], bom=True), "train")
    assert ds.images == ["images/img000.jpg", "images/img001.jpg"] and ds.num_captions == 4
    for suffix, sep in ((".csv", ","), (".tsv", "\t")):
        make_tiny_dataset(tmp_path / "d", n_images=2, caps_per_image=1)
        path = tmp_path / "d" / f"bom{suffix}"
        path.write_text(f"\ufeffimage{sep}caption\nimages/img000.jpg{sep}zero\nimages/img001.jpg{sep}one\n", encoding="utf-8")
        ds = load_dataset(path)
        assert ds.images == ["images/img000.jpg", "images/img001.jpg"] and ds.captions == ["zero", "one"]


# -- flags: --out naming a file, 0 read as "default" -----------------------------------------------
def _main(name: str):
    from distill.pipeline import quickstart
    from distill.pipeline.cache import main as cache_teacher
    from distill.pipeline.export import main as export
    from distill.pipeline.lit import train as train_lit

    return {"cache_teacher": cache_teacher.main, "export": export.main, "train_lit": train_lit.main,
            "quickstart": quickstart.main}[name]


@pytest.mark.parametrize("command, argv", [
    ("cache_teacher", [*CACHE_ARGS[:-2], "--data", "{data}", "--out", "{file}"]),
    ("export", ["--checkpoint", "{student}", "--out", "{file}", "--format", "safetensors"]),
    ("train_lit", ["--data", "{data}", "--out", "{file}", "--device", "cpu"]),
    ("quickstart", ["--data", "{data}", "--out", "{file}", "--device", "cpu"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_out_naming_an_existing_file_is_one_line_before_any_work(tiny, tmp_path, capsys, command, argv):
    from students import create_student, save_student
    from tests.helpers.students import TINY_VIT

    tsv, _ = tiny
    student = save_student(create_student("vit", **TINY_VIT), tmp_path / "student")
    f = tmp_path / "afile"
    f.write_text("keep me")
    argv = [a.format(data=tsv, file=f, student=student) for a in argv]
    assert run_cli(_main(command), argv) == 2
    assert one_error_line(capsys) == f"error: --out {f} is an existing file, not a folder; pass a folder path"
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("command, argv, message", [
    ("quickstart", ["--image-layers", "0"], "--image-layers must be an integer >= 1 (omit it for half the compute), got 0"),
    ("quickstart", ["--teacher-epochs", "0"], "--teacher-epochs must be an integer >= 1, got 0"),
    ("quickstart", ["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    ("train_lit", ["--max-images", "0"], "--max-images must be an integer >= 1 (omit it for every image), got 0"),
    ("train_lit", ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    ("train_lit", ["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    ("train_lit", ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("-") else None)
def test_zero_is_refused_never_read_as_the_default(tiny, tmp_path, capsys, command, argv, message):
    base = ["--data", str(tiny[0]), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert run_cli(_main(command), [*base, *argv]) == 2
    assert one_error_line(capsys) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_lit_and_export_folders_have_one_writer(tiny, tmp_path, capsys):
    from distill.pipeline.export import main as export
    from distill.pipeline.lit import train as train_lit
    from students import create_student, save_student
    from tests.helpers.students import TINY_VIT

    student = save_student(create_student("vit", **TINY_VIT), tmp_path / "student")
    other = os.getppid()
    for command, argv in ((export.main, ["--checkpoint", str(student), "--format", "safetensors"]),
                          (train_lit.main, ["--data", str(tiny[0]), "--device", "cpu"])):
        out = tmp_path / f"out_{command.__module__}"
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": other, "host": socket.gethostname(), "started": "x"}))
        assert run_cli(command, [*argv, "--out", str(out)]) == 2
        assert f"{out} is being written by process {other}" in one_error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# -- Ctrl-C -----------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(tiny, tmp_path, capsys, monkeypatch):
    from tests.helpers.training import die_at

    tsv, cache = tiny
    out = tmp_path / "run"
    die_at(monkeypatch, 5)  # after the checkpoint of step 4
    assert run_cli(ts.main, train_args(cache, tsv, out, 8)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == "interrupted; resume with --resume auto"
    die_at(monkeypatch, 2)  # before any checkpoint
    assert run_cli(ts.main, train_args(cache, tsv, tmp_path / "early", 8)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("interrupted; no checkpoint was written yet: rerun with "
                                                        "--overwrite to start over")
    monkeypatch.undo()
    assert ts.train_from_argv(train_args(cache, tsv, out, 8, "--resume", "auto")).steps == 8
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))


def test_ctrl_c_with_debug_shows_the_traceback(capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert run_cli(main, ["--debug"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "interrupted"


# -- manifest fields that disagree with the arrays ---------------------------------------------------
@pytest.mark.parametrize("field, value, named", [
    ("views", {"count": 5}, "field views.count is 5, but shards[0].arrays."),
    ("dims", {"embed": 7}, "field dims.embed is 7, but shards[0].arrays.image_embed.shape"),
], ids=["views.count", "dims.embed"])
def test_manifest_fields_disagreeing_with_the_arrays_are_one_line_at_open(cache_copy, capsys, field, value, named):
    from tests.helpers.caches import edit_manifest

    edit_manifest(cache_copy, lambda m: m[field].update(value))  # as if written so, checksum and all
    assert run_cli(ts.main, ["--cache", str(cache_copy), "--data", "x", "--device", "cpu"]) == 2
    assert named in one_error_line(capsys)


# -- student folders --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_student_safetensors_is_one_line_naming_the_file(tmp_path, capsys, damage):
    from distill.pipeline import evaluate
    from distill.pipeline.export import main as export
    from students import create_student, save_student
    from tests.helpers.students import TINY_VIT

    folder = save_student(create_student("vit", **TINY_VIT), tmp_path / "student")
    weights = folder / "student.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x04not safetensors")
    for main, argv in ((export.main, ["--checkpoint", str(folder), "--out", str(tmp_path / "e")]),
                       (evaluate.main, ["--model", str(folder), "--data", "x"])):
        assert run_cli(main, argv) == 2
        assert one_error_line(capsys).startswith(f"error: {weights}: not a readable safetensors file")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("where, message", [
    ("{dir}", "error: --out {dir} is a folder; pass a file path"),
    ("{file}/result.json", "error: --out {file}/result.json lies inside {file}, an existing file; pass a path in a folder"),
], ids=["folder", "under-a-file"])
def test_evaluate_out_is_checked_before_the_evaluation(tmp_path, capsys, where, message):
    from distill.pipeline import evaluate

    (tmp_path / "afile").write_text("x")
    names = {"dir": tmp_path, "file": tmp_path / "afile"}
    argv = ["--model", str(tmp_path / "missing-model"), "--out", where.format(**names)]
    assert run_cli(evaluate.main, argv) == 2  # refused before the model is even looked at
    assert one_error_line(capsys) == message.format(**names)
