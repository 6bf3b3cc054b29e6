"""The training checkpoint format, written and read here only: atomic ``torch.save`` of tensors and
plain data, loaded with ``torch.load(weights_only=True)`` so a checkpoint can never execute code.

Content (:func:`checkpoint_payload`, plus ``step``, ``rng`` and ``checksum`` added by
:func:`save_checkpoint`)::

    student, student_config          the student's state dict and create_student kwargs
    stages: [{losses, balancer}]     state dicts of every training stage's loss terms and balancer
    shared: {projections, queue}     the distiller's shared embedding projections and teacher queue
    config                           the resolved training config (dict)
    optimizer, scheduler, scaler     their state dicts
    sampler: {epoch, position}       where the data order resumes
    skipped_nonfinite, skipped_samples, source: {teacher_hash, dataset_fingerprint, cache_settings}
                                     (cache_settings: the cache's storage and views, as JSON)

Checkpoints of the previous layout (``losses`` / ``balancer`` / ``warmup_losses`` instead of
``stages``) are read into this one by :func:`load_checkpoint`.

Layout on disk: ``OUT/checkpoints/step_000123.pt`` plus ``latest.pt``, a copy of the newest step file
(never a hard link, so damage to one file cannot reach the other). RNG states are stored as
tensors/lists so exact resume needs no pickled objects. Which checkpoint a run resumes from, and
which ones it keeps, is the run folder's business (:mod:`distill.pipeline.train.run_dir`).

Integrity: every checkpoint carries ``checksum``, the sha256 of its content (every tensor's dtype,
shape and bytes and every plain value, in key order); :func:`load_checkpoint` recomputes it and
refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from distill.core.errors import CheckpointCorruptError, CheckpointError, StudentFileError

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


def checkpoint_payload(*, student: dict[str, Any], student_config: dict[str, Any], stages: list[dict[str, Any]],
                       shared: dict[str, Any], config: dict[str, Any], optimizer: dict[str, Any],
                       scheduler: dict[str, Any], scaler: dict[str, Any], epoch: int, position: int,
                       skipped_nonfinite: int, skipped_samples: int, source: dict[str, str]) -> dict[str, Any]:
    """The content of a training checkpoint (see the module docstring); ``stages`` holds one
    ``{"losses": state dict, "balancer": state dict}`` per training stage."""
    return {"student": student, "student_config": student_config,
            "stages": [{"losses": s["losses"], "balancer": s["balancer"]} for s in stages], "shared": shared,
            "config": config, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
            "sampler": {"epoch": int(epoch), "position": int(position)}, "skipped_nonfinite": int(skipped_nonfinite),
            "skipped_samples": int(skipped_samples), "source": source}


def save_checkpoint(out: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` (+ ``step``, the RNG states and the checksum) to ``step_XXXXXX.pt``, then copy
    it to ``latest.pt``; returns the step file."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    full = {**state, "step": step, "rng": rng_state()}
    full[CHECKSUM_KEY] = checksum(full)
    _atomic_write(path, lambda tmp: _save_to(full, tmp))
    _atomic_write(folder / LATEST, lambda tmp: _copy_to(path, tmp))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its checksum; anything that needs
    unpickling arbitrary objects is refused with :class:`CheckpointError` (and never executed), a
    damaged file with :class:`CheckpointCorruptError`. A checkpoint of the previous layout comes back
    in the current one (:func:`upgrade`)."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        raise CheckpointCorruptError(f"refusing to load checkpoint {path}: not a plain tensor/data checkpoint "
                                     f"(weights_only load failed: {(str(e).splitlines() or [type(e).__name__])[0]})") from e
    required = ("step", "student", "student_config", "optimizer")
    missing = [k for k in required if k not in state] if isinstance(state, dict) else ["(not a dict)"]
    if not missing and "stages" not in state and not {"losses", "balancer"} <= set(state):
        missing = ["stages"]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        raise CheckpointCorruptError(f"checkpoint {path} carries no checksum (damaged, or written by a version "
                                     "before checksums); it cannot be verified")
    if stored != checksum(state):
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: its content does not match its sha256 checksum")
    return upgrade(state)


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the previous layout (``losses`` + ``balancer`` of the main stage,
    ``warmup_losses`` of the ``train.warmup_stage`` named in its config) in the current one
    (``stages``, plus ``previous_layout: True``); a current one unchanged. The checksum stays that
    of the stored content."""
    if "stages" in state:
        return state
    state = dict(state, previous_layout=True)
    losses, balancer, warmup = state.pop("losses"), state.pop("balancer"), state.pop("warmup_losses", {})
    had_warmup = bool(((state.get("config") or {}).get("train") or {}).get("warmup_stage")) or bool(warmup)
    state["stages"] = ([{"losses": warmup, "balancer": {}}] if had_warmup else []) + \
        [{"losses": losses, "balancer": balancer}]
    return state


def read_student_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(student config, student state dict) of a training checkpoint file, for rebuilding the
    student alone: the checksum is verified when the file has one. Raises :class:`StudentFileError` (a ``ValueError``) for a file
    that is no readable checkpoint, holds no student or is corrupt."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        raise StudentFileError(f"{path}: not a readable torch checkpoint ({e})") from e
    return student_state_from_checkpoint(state, path)


def student_state_from_checkpoint(state: Any, source: str | Path = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
    """(``student_config``, ``student``) of a loaded checkpoint dict (:class:`StudentFileError` when it has
    none, or when its stored checksum does not match)."""
    if not isinstance(state, dict) or "student_config" not in state or "student" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise StudentFileError(f"{source}: expected a checkpoint with 'student_config' and 'student', found {keys}")
    if CHECKSUM_KEY in state and state[CHECKSUM_KEY] != checksum(state):
        raise StudentFileError(f"checkpoint {source} is corrupt: its content does not match its sha256 checksum")
    return state["student_config"], state["student"]
