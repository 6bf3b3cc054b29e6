"""Result files (``benchmarks/results/<name>.json``) and the one summary line each benchmark prints."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common.environment import environment


def write_result(name: str, out: Path, device: torch.device, settings: dict[str, Any], results: dict[str, Any],
                 notes: Sequence[str] = ()) -> Path:
    """Write ``{benchmark, created, environment, settings, results, targets, notes}`` as JSON to ``out``
    (``targets``: the ``targets`` block of ``results``, each ``{value, target, met}``, when it has one)."""
    record = {"benchmark": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(device), "settings": settings, "results": results,
              "targets": results.get("targets", {}), "notes": list(notes)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    """Number for summary lines (``n/a`` for None)."""
    return "n/a" if x is None else f"{x:.{digits}g}"


def print_summary(name: str, text: str, out: Path) -> str:
    """Print the benchmark's one summary line and return it."""
    line = f"{name}: {text} [{out}]"
    print(line, flush=True)
    return line


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or ``den`` is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den
