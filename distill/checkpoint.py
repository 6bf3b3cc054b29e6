"""Training checkpoints: atomic ``torch.save`` of tensors and plain data only, loaded with
``torch.load(weights_only=True)`` so a checkpoint can never execute code.

Layout: ``OUT/checkpoints/step_000123.pt`` plus ``latest.pt`` (a hard link, or a copy where links are
not supported). RNG states are stored as tensors/lists so exact resume needs no pickled objects.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_RE = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not a training checkpoint (e.g. contains pickled code)."""


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. disk full: drop the partial file, earlier checkpoints stay valid
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing checkpoint {path} failed: {e}; earlier checkpoints are intact") from e


def _atomic_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``state`` (+ ``step`` and the RNG states) to ``step_XXXXXX.pt`` and point ``latest.pt``
    at it; keeps only the newest ``keep`` step files when ``keep`` > 0."""
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    _atomic_save({**state, "step": step, "rng": rng_state()}, path)
    _atomic_link(path, folder / "latest.pt")
    if keep > 0:
        steps = sorted(p for p in folder.glob("step_*.pt") if STEP_RE.search(p.name))
        for old in steps[:-keep]:
            old.unlink(missing_ok=True)
    return path


def find_resume(out: str | Path, resume: str | None) -> Path | None:
    """``None``/``""``: no resume; ``"auto"``: ``OUT/checkpoints/latest.pt`` if present; else a path."""
    if not resume:
        return None
    if resume == "auto":
        latest = checkpoint_dir(out) / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = checkpoint_dir(path) / "latest.pt" if (checkpoint_dir(path) / "latest.pt").is_file() else path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint file at {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything that needs unpickling arbitrary objects
    is refused with :class:`CheckpointError` (and never executed)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        raise CheckpointError(f"refusing to load checkpoint {path}: not a plain tensor/data checkpoint "
                              f"(weights_only load failed: {str(e).splitlines()[0]})") from e
    missing = [k for k in ("step", "student", "student_config", "losses", "balancer", "optimizer") if k not in state] \
        if isinstance(state, dict) else ["(not a dict)"]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    return state
