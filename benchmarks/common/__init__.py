"""Helpers shared by the benchmarks, one concern per module, all re-exported here (``from benchmarks
import common as C``; ``C.time_interleaved(...)``):

* :mod:`~benchmarks.common.paths` — the repository, the result folder, the Flickr8k copy;
* :mod:`~benchmarks.common.cli` — common flags and their setup (threads, seed, plugins, clock, device);
* :mod:`~benchmarks.common.environment` — the environment record of every result file;
* :mod:`~benchmarks.common.timing` — interleaved timing on the wall or CPU clock;
* :mod:`~benchmarks.common.memory` — peak RSS and CUDA peak memory;
* :mod:`~benchmarks.common.inputs` — benchmark datasets, shallow teachers, real caches;
* :mod:`~benchmarks.common.results` — the JSON result files and the summary line.

Every benchmark reports ratios measured side by side in one run; timings of the compared
variants are interleaved round by round (:func:`time_interleaved`) so that load from other
processes affects all of them alike. On CPU the default clock is this process's CPU time with
one torch thread (``--clock auto --threads 1``): on a shared, overloaded machine wall time mostly
measures the other processes. Wall and CPU seconds are both recorded in the result files.
"""
from __future__ import annotations

from benchmarks.common.cli import (add_clock_args, add_common_args, add_student_args, require_wall_clock_for_workers,
                                   resolve_device, script_main, setup, student_config)
from benchmarks.common.environment import cpu_model, environment
from benchmarks.common.inputs import (WORDS, benchmark_dataset, build_cache, flickr8k_subset, shallow_teacher_spec,
                                      synthetic_dataset)
from benchmarks.common.memory import PeakRSS, cuda_peak_mb, current_rss_mb, peak_rss_mb
from benchmarks.common.paths import FLICKR8K, REPO, RESULTS_DIR
from benchmarks.common.results import fmt, print_summary, ratio, write_result
from benchmarks.common.timing import Timing, clock_label, now, sync, time_interleaved

__all__ = ["FLICKR8K", "REPO", "RESULTS_DIR", "WORDS", "PeakRSS", "Timing", "add_clock_args", "add_common_args", "script_main",
           "add_student_args", "benchmark_dataset", "build_cache", "clock_label", "cpu_model", "cuda_peak_mb",
           "current_rss_mb", "environment", "flickr8k_subset", "fmt", "now", "peak_rss_mb", "print_summary", "ratio",
           "require_wall_clock_for_workers", "resolve_device", "setup", "shallow_teacher_spec", "student_config",
           "sync", "synthetic_dataset", "time_interleaved", "write_result"]
