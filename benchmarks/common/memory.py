"""Peak memory: this process's resident set (sampled in a thread) and CUDA's allocator peak."""
from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """``with PeakRSS() as m: ...`` samples the RSS in a background thread every ``interval`` s;
    afterwards ``m.baseline_mb``, ``m.peak_mb`` and ``m.delta_mb`` (peak - baseline)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def __enter__(self) -> "PeakRSS":
        self.baseline_mb = self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.baseline_mb


def cuda_peak_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
