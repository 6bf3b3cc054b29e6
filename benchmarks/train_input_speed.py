"""Student input path: pixels read from the teacher cache vs JPEG decoding, and training throughput.

Part 1 (always, one CPU core): samples/s of the student-pixel path of the training loader, per
CPU core, at each ``--sizes`` resolution, side by side in interleaved rounds:

* ``decode``: what the DataLoader workers do without a pixel cache: PIL JPEG decode, the cached
  view's crop/flip, bicubic resize + centre crop, ToTensor + normalise
  (:class:`DistillTrainSet` with ``data.pixels=decode``, the real ``__getitem__``);
* ``pixels``: the same samples read from the pixel cache (``cache_teacher --pixels SIZE``): one
  memory-mapped uint8 gather per batch (:meth:`TeacherCollate.student_pixels`); the normalisation
  runs on the training device (timed separately as ``pixels_normalise_cpu``: its cost when the
  device is this CPU);
* ``jpeg``: the JPEG pixel cache (``--pixel-format jpeg``) read and decoded in one
  ``torchvision.io.decode_jpeg`` batch call on the CPU, plus the normalisation.

Target: ``pixels`` >= 15x ``decode`` samples/s per core.

Part 2 (``--device cuda``, or ``--train-steps N`` on any device): training samples/s of the real
training step (:func:`distill.pipeline.train.loop.train_step`, reading pixels from the cache) of the
pruned student (``lit:default`` teacher's towers, half its image FLOPs) and of the ViT-S/16 ``gpu``
preset in bf16, the model FLOPs utilisation (3 x forward FLOPs per sample from
:func:`distill.core.profile.count_flops`, over ``--peak-tflops``) and the input path's share of the step.
Targets (CUDA only): pruned >= 20,000 samples/s; ViT-S/16 >= 35% of bf16 peak; input share < 10%.

    python benchmarks/train_input_speed.py                       # CPU: 160 and 224 px, Flickr8k images
    python benchmarks/train_input_speed.py --device cuda --images 4096 --train-steps 30
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.cache import TeacherCache  # noqa: E402
from distill.core.data.factory import load_dataset  # noqa: E402
from distill.core.data.pixels import decode_jpeg_batch, normalise_pixels  # noqa: E402
from distill.pipeline.train.data import DistillTrainSet, TeacherCollate  # noqa: E402

NAME = "train_input_speed"
TARGET_SPEEDUP = 15.0
TARGET_PRUNED = 20_000.0
TARGET_MFU = 0.35
TARGET_INPUT_SHARE = 0.10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: dense bf16 peak TFLOP/s by CUDA device name fragment (no sparsity)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    p.add_argument("--teacher", default="openclip:ViT-B-32",
                   help="teacher of the input-path caches (only its output shapes matter; 1-block copy)")
    p.add_argument("--images", type=int, default=64, help="images in the benchmark dataset")
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--sizes", default="160,224", help="student input sizes (px) of part 1")
    p.add_argument("--views", type=int, default=4, help="cached views per image (the decode path crops them)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of part 1")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=None,
                   help="timed training steps per student of part 2 (default: 20 on CUDA, part 2 off on CPU)")
    p.add_argument("--train-students", default="pruned,vit-gpu", help="part 2 students: pruned, vit-gpu")
    p.add_argument("--train-teacher", default="lit:default", help="teacher of part 2 (the pruned student's source)")
    p.add_argument("--pruned-text-layers", type=int, default=2, help="text layers kept by the pruned student")
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--train-precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--train-workers", type=int, default=8, help="DataLoader workers of part 2")
    p.add_argument("--student-cfg", type=json.loads, default={}, metavar="JSON",
                   help="overrides of the part-2 vit student (tests: a tiny one)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device (default: by device name)")
    return p


def student_transform(size: int) -> T.Compose:
    """The students' eval transform (students.base.Student.image_transform) at ``size``."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def input_path_speed(args: argparse.Namespace, tsv: Path, tmp: Path, teacher: str, size: int,
                     device: torch.device) -> dict[str, Any]:
    """Part 1 at one size: interleaved epochs of each path over the same (image, view) samples."""
    common = ["--views", str(args.views), "--image-tokens", "none", "--text-tokens", "none"]
    raw = C.build_cache(teacher, tsv, tmp / f"raw{size}", 32, device, args.plugin, [*common, "--pixels", str(size)])
    jpg = C.build_cache(teacher, tsv, tmp / f"jpeg{size}", 32, device, args.plugin,
                        [*common, "--pixels", str(size), "--pixel-format", "jpeg"])
    ds = load_dataset(str(tsv))
    cache_raw, cache_jpg = TeacherCache(raw), TeacherCache(jpg)
    sets = {"decode": DistillTrainSet(ds, cache_raw, student_transform(size), args.seed, pixels="decode"),
            "pixels": DistillTrainSet(ds, cache_raw, student_transform(size), args.seed, pixels="cache"),
            "jpeg": DistillTrainSet(ds, cache_jpg, student_transform(size), args.seed, pixels="cache")}
    collates = {"decode": TeacherCollate(cache_raw), "pixels": TeacherCollate(cache_raw), "jpeg": TeacherCollate(cache_jpg)}
    n = (ds.num_images // args.batch_size) * args.batch_size
    keys = [(int(i), 0) for i in np.random.default_rng(args.seed).permutation(ds.num_images)[:n]]
    batches = [keys[a:a + args.batch_size] for a in range(0, n, args.batch_size)]
    cpu = torch.device("cpu")

    def student_batch(name: str, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, Any]:
        items = [sets[name][k] for k in rows]
        ids = np.asarray([it["image_index"] for it in items])
        views = np.asarray([it["view"] for it in items])
        return collates[name].student_pixels(items, ids, views)

    def epoch(name: str, normalise: bool = False) -> None:
        for rows in batches:
            pixels, fmt, lengths = student_batch(name, rows)
            if fmt == "jpeg":
                normalise_pixels(decode_jpeg_batch(pixels, lengths, cpu), size, MEAN, STD)
            elif normalise:
                normalise_pixels(pixels.permute(0, 3, 1, 2), size, MEAN, STD)

    # the same samples (captions and views) on every path
    assert len({tuple(s.choose(i, 0) for i, _ in keys) for s in sets.values()}) == 1
    fns = {"decode": lambda: epoch("decode"), "pixels": lambda: epoch("pixels"),
           "pixels_normalise_cpu": lambda: epoch("pixels", normalise=True), "jpeg": lambda: epoch("jpeg")}
    timings = C.time_interleaved(fns, args.warmup, args.repeats, cpu, args.clock)
    rates = {k: n / t.median for k, t in timings.items()}
    # accuracy: the pixel path reproduces the decode path's input (same crop bytes)
    x_dec, _, _ = student_batch("decode", batches[0])
    x_px, _, _ = student_batch("pixels", batches[0])
    max_err = float((normalise_pixels(x_px.permute(0, 3, 1, 2), size, MEAN, STD) - x_dec).abs().max())
    per_sample = {"raw": cache_raw.pixel_size ** 2 * 3,
                  "jpeg": float(np.mean([len(a) for a in [cache_jpg.jpeg([i], 0)[0] for i in range(min(32, ds.num_images))]]))}
    return {"samples_per_s_per_core": rates, "seconds_per_epoch": {k: t.to_json() for k, t in timings.items()},
            "samples_per_epoch": n, "speedup_pixels_vs_decode": rates["pixels"] / rates["decode"],
            "speedup_pixels_normalise_cpu_vs_decode": rates["pixels_normalise_cpu"] / rates["decode"],
            "speedup_jpeg_vs_decode": rates["jpeg"] / rates["decode"], "bytes_per_view": per_sample,
            "max_abs_diff_pixels_vs_decode": max_err}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def train_speed(args: argparse.Namespace, tsv: Path, tmp: Path, device: torch.device, student: str) -> dict[str, Any]:
    """Part 2: the real training step of one student reading pixels from a ``--pixels`` cache."""
    from distill.pipeline.train import loop as tl
    from distill.pipeline.train import main as ts
    from distill.pipeline.train.config import TrainRunConfig
    from distill.core.dist import DistInfo
    from distill.core.data.pixels import student_pixels
    from distill.core.profile import count_flops

    if student == "pruned":
        from students.pruned import half_compute_layers

        preset, layer = None, {"student": {"name": "pruned", "teacher": args.train_teacher,
                                           "image_layers": half_compute_layers(args.train_teacher),
                                           "text_layers": args.pruned_text_layers}}
    elif student == "vit-gpu":
        preset, layer = "gpu", {"student": dict(args.student_cfg)}
    else:
        raise SystemExit(f"error: unknown --train-students entry {student!r} (pruned, vit-gpu)")
    probe = TrainRunConfig.resolve(preset, layers=[layer]).student
    from students import create_student

    size = int(create_student(probe.name, **probe.options).image_size)
    cache = tmp / f"train_cache_{size}"
    if not (cache / "manifest.json").is_file():
        C.build_cache(args.train_teacher, tsv, cache, 64, device, args.plugin,
                      ["--views", "2", "--pixels", str(size), "--image-tokens", "grid:2"])
    run_layer = {"data": {"cache": str(cache), "path": str(tsv), "num_workers": args.train_workers},
                 "out": str(tmp / f"run_{student}"), "device": str(device), "seed": args.seed,
                 "train": {"steps": 10_000, "batch_size": args.train_batch_size, "precision": args.train_precision}}
    config = TrainRunConfig.resolve(preset, layers=[layer, run_layer])
    with contextlib.redirect_stdout(io.StringIO()):  # one summary line
        run = ts.setup(config, DistInfo(0, 1, 0, device))
    run.distiller.train()
    batches = tl.epoch_batches(run, 0, 0)
    input_s = {"t": 0.0}

    def timed_batches():  # the input path: loader wait + host->device copy + pixel decode/normalise
        while True:
            C.sync(device)
            t0 = time.perf_counter()
            e, p, b = next(batches)
            b = b.to(device)
            student_pixels(b, run.student, device)
            C.sync(device)
            input_s["t"] += time.perf_counter() - t0
            yield e, p, b

    it = timed_batches()
    for step in range(3):  # warm-up (workers start, kernels tune)
        tl.train_step(run, it, step)
    steps = args.train_steps
    C.sync(device)
    input_s["t"] = 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        tl.train_step(run, it, 3 + step)
    C.sync(device)
    wall = time.perf_counter() - t0
    rate = steps * args.train_batch_size / wall
    pixels = torch.zeros(1, 3, size, size, device=device)
    text = {k: v.to(device) for k, v in run.student.tokenize(["a dog runs on the grass"]).items()}
    fwd = count_flops(run.student.encode_image, pixels) + count_flops(lambda _: run.student.encode_text(text), pixels)
    peak = peak_tflops(args, device)
    mfu = 3 * fwd * rate / (peak * 1e12) if peak else None
    return {"samples_per_s": rate, "steps": steps, "batch_size": args.train_batch_size, "wall_s": wall,
            "image_size": size, "forward_gflops_per_sample": fwd / 1e9, "train_tflops": 3 * fwd * rate / 1e12,
            "mfu": mfu, "input_share": input_s["t"] / wall, "precision": args.train_precision,
            "student": run.student.config() if student != "pruned" else {"name": "pruned", "teacher": args.train_teacher}}


def targets_block(results: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, r in results["input_path"].items():
        v = r["speedup_pixels_vs_decode"]
        out[f"pixels_vs_decode_{size}px"] = {"value": v, "target": TARGET_SPEEDUP, "met": v >= TARGET_SPEEDUP}
    train = results.get("train", {})
    if device.type == "cuda":
        if "pruned" in train:
            v = train["pruned"]["samples_per_s"]
            out["pruned_samples_per_s"] = {"value": v, "target": TARGET_PRUNED, "met": v >= TARGET_PRUNED}
        if "vit-gpu" in train and train["vit-gpu"]["mfu"] is not None:
            v = train["vit-gpu"]["mfu"]
            out["vit_s16_bf16_mfu"] = {"value": v, "target": TARGET_MFU, "met": v >= TARGET_MFU}
        for name, r in train.items():
            out[f"{name}_input_share"] = {"value": r["input_share"], "target": TARGET_INPUT_SHARE,
                                          "met": r["input_share"] < TARGET_INPUT_SHARE}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    if args.train_steps is None:
        args.train_steps = 20 if device.type == "cuda" else 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict[str, Any] = {"input_path": {}, "train": {}}
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        teacher = C.shallow_teacher_spec(args.teacher, 1, tmp / "teacher_cfg") or args.teacher
        for size in sizes:
            results["input_path"][str(size)] = input_path_speed(args, tsv, tmp, teacher, size, torch.device("cpu"))
        if args.train_steps:
            for student in [s.strip() for s in args.train_students.split(",") if s.strip()]:
                results["train"][student] = train_speed(args, tsv, tmp, device, student)
    results["targets"] = targets_block(results, device)
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc}
    notes = ["part 1 runs on one CPU core (num_workers 0, 1 torch thread, process CPU time): samples/s per core",
             "pixels = the loader's work with a pixel cache (uint8 gather); on a GPU the normalisation runs on the "
             "device, pixels_normalise_cpu adds it on this CPU",
             "the decode path crops the same cached views and resizes with PIL bicubic, as DistillTrainSet does"]
    if not args.train_steps:
        notes.append("part 2 (training samples/s, MFU, input share) not run: needs --device cuda or --train-steps")
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    parts = [f"{s}px pixels {r['samples_per_s_per_core']['pixels']:.0f}/s vs decode {r['samples_per_s_per_core']['decode']:.0f}/s "
             f"per core = {r['speedup_pixels_vs_decode']:.1f}x (jpeg {r['speedup_jpeg_vs_decode']:.1f}x)"
             for s, r in results["input_path"].items()]
    parts += [f"train {k} {r['samples_per_s']:.0f} samples/s, input share {100 * r['input_share']:.0f}%"
              + (f", MFU {100 * r['mfu']:.0f}%" if r["mfu"] is not None else "") for k, r in results["train"].items()]
    met = all(t["met"] for t in results["targets"].values())
    C.print_summary(NAME, "; ".join(parts) + f" (targets {'met' if met else 'NOT all met'}; {C.clock_label(args)})", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
