"""The benchmarks' shared command-line flags and their setup (threads, seed, plugins, clock, device)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from benchmarks.common.paths import RESULTS_DIR
from distill.core.registry import load_plugins


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


def require_wall_clock_for_workers(args: argparse.Namespace) -> None:
    """DataLoader workers are other processes: their CPU time is invisible to ``--clock cpu``."""
    if args.num_workers > 0 and args.clock == "cpu":
        raise SystemExit("error: --num-workers > 0 needs --clock wall (worker processes are not in this process's CPU time)")


def script_main(main: Callable[[list[str]], Any]) -> NoReturn:
    """``if __name__ == "__main__": script_main(main)``. A benchmark's ``main(argv)`` returns its
    result dict (what the tests and other benchmarks read); as a script it exits 0 once the result
    is written, or 2 with one ``error: ...`` line for bad input (:func:`distill.pipeline.cli.cli_main`)."""
    from distill.pipeline.cli import cli_main

    def command(argv: list[str]) -> int:
        main(argv)
        return 0

    cli_main(command)
