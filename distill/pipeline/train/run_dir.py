"""The run folder ``OUT`` of a training run: refusing to train into an earlier run unless asked
(``--resume`` / ``--overwrite``, :class:`RunFolderError`), refusing ``--resume auto`` on a folder
whose log outlived every checkpoint (it would restart at step 0 and rewrite the log), one writer
per folder is :func:`distill.core.lock.output_lock` (``OUT/writer.lock``), clearing it for
``--overwrite``, deleting leftovers of interrupted checkpoint writes, choosing the checkpoint to
resume from (``--resume auto``: the newest intact one, warning about each damaged newer one,
``latest.pt`` last), checking that it was trained on the same kind of cache
(:func:`check_resume_source`) and keeping only the newest ``train.keep_checkpoints`` step files.

The checkpoint files themselves (content, checksum, atomic writes) are :mod:`distill.core.checkpoint`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from distill.core.checkpoint import LATEST, TMP_RE, checkpoint_dir, load_checkpoint, step_files
from distill.core.errors import CheckpointCorruptError, CheckpointError, ResumeMismatchError, RunFolderError
from distill.pipeline.settings import check_out_folder
from distill.pipeline.train.log import LOG_NAME

#: What a training run writes into its folder (``--overwrite`` removes exactly these).
RUN_OUTPUTS = ("checkpoints", "student", "plots", "tb", "train_log.jsonl", "config.yaml")


def _warn(msg: str) -> None:
    print(f"distill: warning: {msg}", file=sys.stderr, flush=True)


def check_run_dir(out: str | Path, resume: str | None, overwrite: bool) -> list[str]:
    """Raise :class:`RunFolderError` if ``out`` holds an earlier run and neither ``resume`` nor
    ``overwrite`` is given (or both are); returns the run outputs present in ``out``."""
    out = check_out_folder(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise RunFolderError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume auto to "
                             "continue it or --overwrite to replace it")
    log = out / LOG_NAME
    if resume == "auto" and log.is_file() and log.stat().st_size > 0 and not has_checkpoint(out):
        raise RunFolderError(f"--resume auto: {out} holds a training log ({log}) but no checkpoint to resume from "
                             f"(every file of {checkpoint_dir(out)} is gone); resuming would restart at step 0 and "
                             "overwrite the log: pass --overwrite to start over, or remove the log")
    return existing


def has_checkpoint(out: str | Path) -> bool:
    """Whether the run folder ``out`` holds a checkpoint file (intact or not) to resume from."""
    return bool(_checkpoint_files(checkpoint_dir(out)))


def _checkpoint_files(folder: Path) -> list[Path]:
    """Step files (newest first) then ``latest.pt`` of a checkpoint folder: the resume candidates."""
    if not folder.is_dir():
        return []
    return [p for p in [*reversed(step_files(folder)), folder / LATEST] if p.is_file()]


def prepare_run_dir(out: str | Path, resume: str | None, overwrite: bool) -> None:
    """On the main rank before training: :func:`check_run_dir`, delete the earlier run's outputs
    with ``overwrite``, and delete stale ``.tmp-*`` checkpoint files."""
    out = Path(out)
    existing = check_run_dir(out, resume, overwrite)
    if overwrite:
        for name in existing:
            p = out / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in clean_stale_tmp(out):
        _warn(f"deleted {p}, left over from an interrupted checkpoint write")


def clean_stale_tmp(out: str | Path) -> list[Path]:
    """Delete ``.*.tmp-<pid>`` leftovers of interrupted checkpoint writes (those of live processes
    other than this one are kept); returns the deleted paths."""
    folder = checkpoint_dir(out)
    removed = []
    for p in folder.glob(".*.tmp-*") if folder.is_dir() else ():
        m = TMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def prune_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step files (``keep`` 0: keep every one); returns the
    deleted paths. ``latest.pt`` always stays."""
    if keep <= 0:
        return []
    old = step_files(checkpoint_dir(out))[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def find_resume(out: str | Path, resume: str | None) -> Path | None:
    """The checkpoint :func:`load_resume` would resume from (``None``: start fresh)."""
    found = load_resume(out, resume)
    return found[0] if found else None


def load_resume(out: str | Path, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
    """``None``/``""``: no resume. ``"auto"`` (or a run folder): the newest intact checkpoint of
    ``OUT/checkpoints`` (step files newest first, then ``latest.pt``), skipping damaged ones with a
    warning; ``None`` when the folder holds no checkpoint; :class:`CheckpointCorruptError` when every
    one is damaged. A file path must itself be intact. Returns (path, loaded state)."""
    if not resume:
        return None
    path = Path(out) if resume == "auto" else Path(resume)
    if not (resume == "auto" or path.is_dir()):
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no checkpoint file at {path}")
        return path, load_checkpoint(path)
    folder = checkpoint_dir(path) if checkpoint_dir(path).is_dir() or resume == "auto" else path
    candidates = _checkpoint_files(folder)
    if not candidates:
        if resume != "auto":
            raise CheckpointError(f"--resume {resume}: no checkpoint in {folder}")
        return None
    errors = []
    for p in candidates:
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            errors.append(str(e))
            _warn(f"{e}; trying an older checkpoint")
            continue
        if errors:
            _warn(f"resuming from {p}, the newest intact checkpoint")
        return p, state
    raise CheckpointCorruptError(f"--resume {resume}: no intact checkpoint in {folder} ({len(errors)} damaged: "
                                 + "; ".join(errors) + ")")


def check_resume_source(saved: dict[str, str], now: dict[str, str], cache: str | Path) -> None:
    """Raise :class:`ResumeMismatchError` unless a checkpoint's ``source`` (teacher hash, dataset
    fingerprint, cache storage/view settings) matches the cache the run resumes with. A checkpoint
    written before the settings were recorded is resumed with a warning that they cannot be checked."""
    for key, value in now.items():
        if key not in saved:
            if key == "cache_settings":
                _warn(f"the checkpoint predates the record of its cache's storage settings: cannot check that "
                      f"{cache} has the token storage, views, pixels and dtype it was trained with")
            continue
        if saved[key] == value:
            continue
        if key == "cache_settings":
            diff = _diff(json.loads(saved[key]), json.loads(value))
            was = ", ".join(f"{k}={a}" for k, a, _ in diff)
            has = ", ".join(f"{k}={b}" for k, _, b in diff)
            raise ResumeMismatchError(f"the checkpoint was trained on a cache with {was}, but {cache} has {has} "
                                      "(rebuilt with other storage or view settings); resume with the original "
                                      "cache or start over with --overwrite")
        raise ResumeMismatchError(f"the checkpoint was trained on a cache with {key} {saved[key][:12]}, but "
                                  f"{cache} has {value[:12]} (rebuilt with another teacher or dataset); "
                                  "resume with the original cache or start over with --overwrite")


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value in ``a``, value in ``b``) of every difference of two JSON objects; a key
    missing on one side is shown as ``absent``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(a.keys() | b.keys()):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append((name, json.dumps(a[k]) if k in a else "absent", json.dumps(b[k]) if k in b else "absent"))
            else:
                out += _diff(a[k], b[k], name)
        return out
    return [] if a == b else [(prefix, json.dumps(a), json.dumps(b))]
