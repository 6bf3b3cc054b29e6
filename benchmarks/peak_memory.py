"""Peak memory of caching (teacher forward + shard writing) and of training (student step).

Each phase runs in a fresh subprocess (``distill.cache_teacher`` then ``distill.train_student`` on
the cache it wrote, ``--num-workers 0`` so that everything is in that one process) which reports
its own peak RSS (``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``. A third
subprocess that only imports the same modules gives the baseline. Reported side by side:
absolute peaks, peaks net of the baseline, and training / caching ratios.

    python benchmarks/peak_memory.py                           # ViT-L/14 teacher, ViT-S/16 student
    python benchmarks/peak_memory.py --device cuda --images 512 --batch-size 128 --amp
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402

NAME = "peak_memory"
# argv: module ("-" = import only) result.json [module args...]
CHILD = """
import importlib, json, resource, sys
import torch
module, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
importlib.import_module("distill.cache_teacher"); importlib.import_module("distill.train_student")
if module != "-":
    importlib.import_module(module).main(argv)
cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
json.dump({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda_peak_mb": cuda}, open(out, "w"))
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_student_args(p)
    p.add_argument("--teacher", default="openclip:ViT-L-14", help="teacher spec (random init unless a tag/path is given)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--batch-size", type=int, default=4, help="caching and training batch size")
    p.add_argument("--steps", type=int, default=2, help="training steps")
    p.add_argument("--image-tokens", default="full", help="cache --image-tokens")
    p.add_argument("--amp", action="store_true", help="fp16 teacher (cache --amp) and bf16 training (CUDA)")
    return p


def measure(module: str, argv: Sequence[str], tmp: Path) -> dict[str, Any]:
    """Run ``module.main(argv)`` in a fresh interpreter; its peak memory and wall seconds."""
    out = tmp / f"mem_{module.replace('.', '_')}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(C.REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, module, str(out), *argv], cwd=C.REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{module} {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    plugins = [a for m in args.plugin for a in ("--plugin", m)]
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        cache_argv = ["--teacher", args.teacher, "--data", str(tsv), "--out", str(tmp / "cache"), "--batch-size",
                      str(args.batch_size), "--num-workers", "0", "--device", args.device,
                      "--image-tokens", args.image_tokens, *(["--amp"] if args.amp else []), *plugins]
        sets = [f"student.{k}={v}" for k, v in C.student_config(args).items()]
        train_argv = ["--cache", str(tmp / "cache"), "--data", str(tsv), "--out", str(tmp / "run"), "--student", "vit",
                      "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--num-workers", "0",
                      "--device", args.device, "--seed", str(args.seed), *(["--precision", "bf16"] if args.amp else []),
                      *[a for s in sets for a in ("--set", s)], *plugins]
        phases = {"baseline": measure("-", [], tmp), "caching": measure("distill.cache_teacher", cache_argv, tmp),
                  "training": measure("distill.train_student", train_argv, tmp)}
    base = phases["baseline"]["peak_rss_mb"]
    net = {k: phases[k]["peak_rss_mb"] - base for k in ("caching", "training")}
    cuda = {k: phases[k]["cuda_peak_mb"] for k in ("caching", "training")}
    results = {"phases": phases, "net_peak_rss_mb": net,
               "training_vs_caching_peak_rss": phases["training"]["peak_rss_mb"] / phases["caching"]["peak_rss_mb"],
               "training_vs_caching_net_rss": C.ratio(net["training"], net["caching"]),
               "training_vs_caching_cuda_peak": C.ratio(cuda["training"], cuda["caching"])}
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc}
    notes = ["each phase is a fresh process; baseline = the same imports without running anything",
             "num_workers=0 everywhere, so the one process holds all the memory of its phase"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    gpu = "" if device.type != "cuda" else (f"; CUDA peak caching {C.fmt(cuda['caching'], 4)} MiB, training "
                                            f"{C.fmt(cuda['training'], 4)} MiB")
    C.print_summary(NAME, f"peak RSS caching {phases['caching']['peak_rss_mb']:.0f} MiB (+{net['caching']:.0f} over "
                          f"{base:.0f} MiB imports), training {phases['training']['peak_rss_mb']:.0f} MiB "
                          f"(+{net['training']:.0f}); training/caching {results['training_vs_caching_peak_rss']:.2f}x{gpu}",
                    out)
    return results


if __name__ == "__main__":
    C.script_main(main)
