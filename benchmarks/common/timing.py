"""Interleaved timing of compared variants on the wall or the process-CPU clock.

Timings of the compared variants are interleaved round by round (:func:`time_interleaved`) so that
load from other processes affects all of them alike; wall and CPU seconds are both kept.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall and process-CPU seconds of each timed repeat (warm-up excluded); ``clock`` selects
    which of them ``times``/``median`` report."""

    wall: list[float]
    cpu: list[float]
    clock: str = "wall"

    @property
    def times(self) -> list[float]:
        return self.cpu if self.clock == "cpu" else self.wall

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "clock": self.clock, "times_s": self.times, "wall_s": self.wall,
                "cpu_s": self.cpu}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     device: torch.device, clock: str = "wall") -> dict[str, Timing]:
    """Run every function once per round (in the given order) for ``warmup`` untimed rounds and
    ``repeats`` timed rounds; returns the per-function timings (medians on ``clock``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be wall or cpu, not {clock!r}")
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if r >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: Timing(wall[k], cpu[k], clock) for k in fns}


def now(clock: str) -> float:
    """The current reading of ``clock`` (``wall``: perf_counter, ``cpu``: this process's CPU time)."""
    return time.process_time() if clock == "cpu" else time.perf_counter()


def clock_label(args: argparse.Namespace) -> str:
    """``"cpu time, 1 thread"`` / ``"wall time"`` for summary lines."""
    if args.clock == "cpu":
        return f"cpu time, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
    return "wall time"
