"""Training checkpoints: atomic ``torch.save`` of tensors and plain data only, loaded with
``torch.load(weights_only=True)`` so a checkpoint can never execute code.

Layout: ``OUT/checkpoints/step_000123.pt`` plus ``latest.pt``, a copy of the newest step file (never
a hard link, so damage to one file cannot reach the other). RNG states are stored as tensors/lists
so exact resume needs no pickled objects.

Integrity: every checkpoint carries ``checksum``, the sha256 of its content (every tensor's dtype,
shape and bytes and every plain value, in key order); :func:`load_checkpoint` recomputes it and
refuses a mismatch. ``--resume auto`` (:func:`find_resume`) takes the newest step file that loads and
verifies, warning about each damaged newer one, and falls back to ``latest.pt`` last.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from distill.core.errors import CheckpointError, CheckpointCorruptError, RunFolderError

STEP_RE = re.compile(r"step_(\d+)\.pt$")
TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")
LATEST = "latest.pt"
CHECKSUM_KEY = "checksum"


def _digest(obj: Any, h: "hashlib._Hash") -> None:
    """Feed a canonical encoding of ``obj`` (nested dicts/lists of tensors and plain values) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def checksum(state: dict[str, Any]) -> str:
    """sha256 of a checkpoint's content, ``checksum`` entry excluded."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM_KEY}, h)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states as tensors/lists/ints."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``; a failure (e.g. disk full) leaves no partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # earlier checkpoints stay valid
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing checkpoint {path} failed: {e}; earlier checkpoints are intact") from e


def _save_to(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _copy_to(src: Path, tmp: Path) -> None:
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_files(folder: Path) -> list[Path]:
    """``step_*.pt`` files of a checkpoint folder, oldest first."""
    return sorted((p for p in folder.glob("step_*.pt") if STEP_RE.search(p.name)),
                  key=lambda p: int(STEP_RE.search(p.name).group(1)))


def save_checkpoint(out: str | Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``state`` (+ ``step``, the RNG states and the checksum) to ``step_XXXXXX.pt``, then copy
    it to ``latest.pt``; keeps only the newest ``keep`` step files when ``keep`` > 0."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    full = {**state, "step": step, "rng": rng_state()}
    full[CHECKSUM_KEY] = checksum(full)
    _atomic_write(path, lambda tmp: _save_to(full, tmp))
    _atomic_write(folder / LATEST, lambda tmp: _copy_to(path, tmp))
    if keep > 0:
        for old in step_files(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


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


def _warn(msg: str) -> None:
    print(f"distill: warning: {msg}", file=sys.stderr, flush=True)


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
    candidates = [p for p in [*reversed(step_files(folder)), folder / LATEST] if p.is_file()] if folder.is_dir() else []
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its checksum; anything that needs
    unpickling arbitrary objects is refused with :class:`CheckpointError` (and never executed), a
    damaged file with :class:`CheckpointCorruptError`."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        raise CheckpointCorruptError(f"refusing to load checkpoint {path}: not a plain tensor/data checkpoint "
                                     f"(weights_only load failed: {(str(e).splitlines() or [type(e).__name__])[0]})") from e
    missing = [k for k in ("step", "student", "student_config", "losses", "balancer", "optimizer") if k not in state] \
        if isinstance(state, dict) else ["(not a dict)"]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        raise CheckpointCorruptError(f"checkpoint {path} carries no checksum (damaged, or written by a version "
                                     "before checksums); it cannot be verified")
    if stored != checksum(state):
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: its content does not match its sha256 checksum")
    return state


#: What a training run writes into its folder (``--overwrite`` removes exactly these).
RUN_OUTPUTS = ("checkpoints", "student", "plots", "tb", "train_log.jsonl", "config.yaml")


def check_run_dir(out: str | Path, resume: str | None, overwrite: bool) -> list[str]:
    """Raise :class:`RunFolderError` if ``out`` holds an earlier run and neither ``resume`` nor
    ``overwrite`` is given (or both are); returns the run outputs present in ``out``."""
    out = Path(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise RunFolderError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume auto to "
                             "continue it or --overwrite to replace it")
    return existing


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
