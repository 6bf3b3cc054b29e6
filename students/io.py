"""Saving and loading trained students.

A saved student is a folder with ``student.safetensors`` (weights) and ``student.json``::

    {"format_version": 1, "config": {"name": "vit", ...},   # kwargs of students.create_student
     "tokenizer": {...}, "preprocess": {...}, "num_params": N}

:func:`load_student` also reads training checkpoints (their format is
:mod:`distill.core.checkpoint`, which hands over ``student_config``, the config above, and the
``student`` state dict).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.core.errors import CheckpointCorruptError, CheckpointError, StudentFileError
from students.base import Student

FORMAT_VERSION = 1
WEIGHTS_FILE = "student.safetensors"
CONFIG_FILE = "student.json"


def save_student(student: Student, path_dir: str | Path) -> Path:
    """Write ``student.safetensors`` + ``student.json`` into ``path_dir`` (created); returns it."""
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": student.config(),
        "tokenizer": student.tokenizer_info(),
        "preprocess": student.preprocess_info(),
        "num_params": student.num_params(),
    }
    save_model(student, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild a student (in eval mode) from a :func:`save_student` folder (or its
    ``student.json`` / ``student.safetensors``) or from a training checkpoint file."""
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_FILE, CONFIG_FILE):
        p = p.parent
    if p.is_dir():
        student = _load_folder(p)
    elif p.is_file():
        student = _load_checkpoint(p)
    else:
        raise FileNotFoundError(f"no student folder or checkpoint at {p}")
    return student.to(device).eval()


def _build(config: Any, source: Path) -> Student:
    from distill.core.registry import create_student

    if not isinstance(config, dict) or "name" not in config:
        raise StudentFileError(f"{source}: student config must be a dict with a 'name', got {config!r}")
    return create_student(**config)


def _load_folder(folder: Path) -> Student:
    meta_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for f in (meta_path, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a saved student: missing {f.name}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise StudentFileError(f"{meta_path}: invalid JSON ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise StudentFileError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    student = _build(meta.get("config"), meta_path)
    try:
        missing, unexpected = load_model(student, str(weights), strict=False)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, torch RuntimeError variants
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointCorruptError(f"{weights}: not a readable safetensors file ({first}); the student folder is "
                                     "damaged (truncated or overwritten): save or export it again") from e
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the config in {meta_path}: "
                              f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return student


def _load_checkpoint(path: Path) -> Student:
    from distill.core.checkpoint import read_student_checkpoint

    config, state = read_student_checkpoint(path)
    student = _build(config, path)
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: student weights do not match its student_config: {e}") from e
    return student
