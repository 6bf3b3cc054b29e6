"""Helpers shared by the benchmarks: CLI flags, environment record, interleaved timing, peak
memory, benchmark datasets/teachers and the JSON result files (``benchmarks/results/<name>.json``).

Every benchmark reports ratios measured side by side in one run; timings of the compared
variants are interleaved round by round (:func:`time_interleaved`) so that load from other
processes affects all of them alike. On CPU the default clock is this process's CPU time with
one torch thread (``--clock auto --threads 1``): on a shared, overloaded machine wall time mostly
measures the other processes. Wall and CPU seconds are both recorded in the result files.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distill.core.registry import load_plugins

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))
WORDS = ["a", "the", "dog", "cat", "child", "man", "woman", "runs", "sits", "jumps", "on", "in", "near", "red",
         "blue", "green", "grass", "beach", "water", "street", "ball", "bike", "snow", "playing", "with"]


# ------------------------------------------------------------------------------------ CLI
def add_common_args(p: argparse.ArgumentParser, name: str) -> None:
    """``--device``, ``--threads``, ``--seed``, ``--plugin`` and ``--out`` (default results/<name>.json)."""
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugin", action="append", default=[], help="module to import first (registers teachers)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="result JSON path")


def add_clock_args(p: argparse.ArgumentParser) -> None:
    """``--clock`` (resolved by :func:`setup`) and a default of one torch thread, so that CPU timings
    measure this process rather than the load of a shared machine."""
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="timing clock: cpu = this process's CPU time (all its threads, not DataLoader workers); "
                        "auto = cpu on CPU devices, wall on CUDA")
    p.set_defaults(threads=1)


def add_student_args(p: argparse.ArgumentParser) -> None:
    """``--student-preset`` (a ``vit`` preset, default ViT-S/16) and ``--student-cfg`` (JSON overrides)."""
    p.add_argument("--student-preset", default="vit-s16", help="vit student preset (students.vit_dual.VIT_PRESETS)")
    p.add_argument("--student-cfg", type=json.loads, default={}, metavar="JSON",
                   help='vit student overrides, e.g. \'{"vision_layers": 2, "image_size": 64}\'')


def student_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``create_student("vit", **cfg)`` keyword arguments selected by :func:`add_student_args`."""
    return {"preset": args.student_preset, **args.student_cfg}


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``/``--seed``, resolve ``--clock auto``, import ``--plugin`` modules; returns
    the torch device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    load_plugins(args.plugin)
    device = resolve_device(args.device)
    if getattr(args, "clock", None) == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    return device


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device with an index on CUDA: ``cuda`` becomes ``cuda:<current
    device>`` (``torch.cuda.set_device`` and the memory statistics need the index)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r} is not a device (cpu | cuda | cuda:<i>): {e}") from e
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but CUDA is not available")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


# ------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Software/hardware description stored in every result file."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device), "cuda_device": None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import open_clip

        env["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------ timing
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


def require_wall_clock_for_workers(args: argparse.Namespace) -> None:
    """DataLoader workers are other processes: their CPU time is invisible to ``--clock cpu``."""
    if args.num_workers > 0 and args.clock == "cpu":
        raise SystemExit("error: --num-workers > 0 needs --clock wall (worker processes are not in this process's CPU time)")


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or ``den`` is 0."""
    if num is None or den is None or den == 0:
        return None
    return num / den


# ------------------------------------------------------------------------------------ memory
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


# ------------------------------------------------------------------------------------ inputs
def synthetic_dataset(root: Path, n_images: int, caps_per_image: int = 5, size: int = 160, seed: int = 0) -> Path:
    """Write ``n_images`` random JPEGs and a ``captions.tsv``; returns the TSV path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for i in range(n_images):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i:05d}.jpg")
        for _ in range(caps_per_image):
            lines.append(f"images/{i:05d}.jpg\t{' '.join(rng.choice(WORDS, size=int(rng.integers(6, 16))))} .")
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def flickr8k_subset(root: Path, n_images: int, split: str = "train") -> Path:
    """A ``captions.tsv`` of the first ``n_images`` images of a Flickr8k split, the images copied
    to ``root/images`` (dataset paths must stay inside the data root)."""
    names = (FLICKR8K / "splits" / f"{split}.txt").read_text().split()[:n_images]
    if len(names) < n_images:
        raise ValueError(f"{FLICKR8K}/splits/{split}.txt lists only {len(names)} images, {n_images} requested")
    wanted = set(names)
    caps: dict[str, list[str]] = {n: [] for n in names}
    with open(FLICKR8K / "captions.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            image, _, caption = line.rstrip("\n").split("\t", 2)
            if image in wanted:
                caps[image].append(caption)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(FLICKR8K / "images" / n, root / "images" / n)
    lines = ["image\tcaption"] + [f"images/{n}\t{c}" for n in names for c in caps[n]]
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def benchmark_dataset(root: Path, n_images: int, source: str = "auto", seed: int = 0) -> tuple[Path, str]:
    """(TSV path, description): Flickr8k images (``auto`` when present, or ``flickr8k``) or
    synthetic 160 px JPEGs (``synthetic``)."""
    if source not in ("auto", "flickr8k", "synthetic"):
        raise ValueError(f"--data must be auto, flickr8k or synthetic, not {source!r}")
    use_flickr = source == "flickr8k" or (source == "auto" and (FLICKR8K / "captions.tsv").is_file())
    if use_flickr:
        return flickr8k_subset(root, n_images), f"first {n_images} Flickr8k train images ({FLICKR8K})"
    return synthetic_dataset(root, n_images, seed=seed), f"{n_images} synthetic 160 px images, 5 captions each"


def shallow_teacher_spec(spec: str, layers: int, folder: Path) -> str | None:
    """For a random-init ``openclip:<built-in model>`` spec, a spec of the same architecture with
    only ``layers`` blocks per tower (identical output shapes, a fraction of the compute); written
    as a config JSON in ``folder``. None for any other spec."""
    backend, _, rest = spec.partition(":")
    if backend != "openclip" or ":" in rest or rest.endswith(".json") or rest.startswith(("local-dir", "hf-hub")):
        return None
    import open_clip

    cfg = open_clip.get_model_config(rest)
    if cfg is None:
        return None
    cfg["vision_cfg"]["layers"] = layers
    cfg["text_cfg"]["layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rest}-{layers}blk.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return f"openclip:{path}"


def build_cache(teacher: str, tsv: Path, out: Path, batch_size: int, device: torch.device, plugins: Sequence[str] = (),
                extra: Sequence[str] = ()) -> Path:
    """Write a real teacher cache of ``tsv`` with ``python -m distill.cache_teacher`` (in-process,
    its report and progress bar suppressed so that the benchmark prints one line)."""
    from distill.pipeline.cache.main import main as cache_main

    argv = ["--teacher", teacher, "--data", str(tsv), "--out", str(out), "--batch-size", str(batch_size),
            "--num-workers", "0", "--device", str(device), *[a for m in plugins for a in ("--plugin", m)], *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache_main(argv)
    return out


# ------------------------------------------------------------------------------------ results
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
