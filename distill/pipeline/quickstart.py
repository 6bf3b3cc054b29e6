"""End-to-end quickstart: LiT teacher -> teacher cache -> student distillation -> evaluation.

Runs offline on CPU on the sample bundled in ``examples/sample_flickr8k`` (300 train / 100 test
Flickr8k images, 5 captions each) or on any Flickr8k-layout folder / dataset given with ``--data``,
and prints teacher vs student Recall@K, RSUM, parameters and images/s (median of 5 timings).

    python -m distill.quickstart                                   # bundled sample, < 10 min on 2 cores
    python -m distill.quickstart --data ../shared/data/flickr8k    # full Flickr8k (6K train / 1K test)
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.pipeline.cli import ArgumentParser
from distill.pipeline.settings import Setting, check_args, check_out_folder
from distill.core.profile import count_params, images_per_second

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample_flickr8k"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SAMPLE), help="Flickr8k-layout folder or dataset file (default: bundled sample)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--out", default="runs/quickstart", help="working folder (teacher, cache, student, results)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--student", default="pruned", choices=["pruned", "vit"],
                   help="pruned: first layers of the teacher's own towers (default); vit: small ViT from scratch")
    p.add_argument("--steps", type=int, default=60, help="student optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-image-size", type=int, default=160)
    p.add_argument("--teacher-epochs", type=int, default=30, help="LiT projection epochs")
    p.add_argument("--image-layers", type=int, default=None, help="pruned student: teacher image blocks kept (default: half the compute)")
    p.add_argument("--text-layers", type=int, default=3, help="pruned student: teacher text layers kept")
    p.add_argument("--trainable-image-blocks", type=int, default=4,
                   help="pruned student: train only the last N kept image blocks (the rest stay frozen)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    check_args(args, ARG_RULES)  # before any work: 0 is refused, never read as "the default"
    check_out_folder(args.out)
    return args


#: Value checks of the numeric flags (distill.pipeline.settings.check_args).
ARG_RULES = (Setting("steps", "int", lambda v: v >= 1, "an integer >= 1", "--steps"),
             Setting("batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--batch-size"),
             Setting("teacher_image_size", "int", lambda v: v >= 1, "an integer >= 1", "--teacher-image-size"),
             Setting("teacher_epochs", "int", lambda v: v >= 1, "an integer >= 1", "--teacher-epochs"),
             Setting("image_layers", "int", lambda v: v >= 1, "an integer >= 1 (omit it for half the compute)",
                     "--image-layers", nullable=True),
             Setting("text_layers", "int", lambda v: v >= 1, "an integer >= 1", "--text-layers"),
             Setting("trainable_image_blocks", "int", lambda v: v >= 0, "an integer >= 0", "--trainable-image-blocks"),
             Setting("workers", "int", lambda v: v >= 0, "an integer >= 0", "--workers"))


def _run_teacher(args: argparse.Namespace, out: Path) -> str:
    from distill.pipeline.lit.train import train_lit

    folder = out / "teacher"
    if not (folder / "lit.json").is_file():
        result = train_lit(args.data, str(folder), split=args.train_split, epochs=args.teacher_epochs,
                           image_size=args.teacher_image_size, device=args.device, workers=args.workers)
        print(json.dumps(result.summary(), indent=2), flush=True)
    else:
        print(f"reusing the LiT teacher trained earlier in {folder} (delete it to retrain)", flush=True)
    return f"lit:{folder}"


def _run_cache(args: argparse.Namespace, teacher: str, out: Path) -> Path:
    from distill.core.cache.encode import parse_token_mode
    from distill.pipeline.cache.run import run_cache
    from distill.pipeline.cache.settings import CacheJob, CacheSettings

    cache = out / "cache"
    result = run_cache(CacheSettings(image_tokens=parse_token_mode("grid:5")),
                       CacheJob(teacher, args.data, cache, split=args.train_split, device=args.device,
                                num_workers=args.workers))
    print(result.summary(), flush=True)
    return cache


def _run_student(args: argparse.Namespace, teacher: str, cache: Path, out: Path) -> Path:
    from distill.pipeline.recipes import pruned_student_recipe
    from distill.pipeline.train.config import TrainRunConfig
    from distill.pipeline.train.main import train
    from distill.pipeline.train.run_dir import has_checkpoint

    run = out / f"student_{args.student}"
    layers = [{"data": {"cache": str(cache), "path": args.data, "split": args.train_split, "num_workers": args.workers},
               "out": str(run), "device": args.device, "train": {"steps": args.steps, "batch_size": args.batch_size}}]
    if args.student == "pruned":
        layers.append(pruned_student_recipe(teacher, args.image_layers, args.text_layers,
                                            args.trainable_image_blocks, lr=5e-4, init_projections=512))
    # resume an interrupted student run; one stopped before its first checkpoint starts over
    resumable = has_checkpoint(run)
    train(TrainRunConfig.resolve("cpu", layers=layers), resume="auto" if resumable else None, overwrite=not resumable)
    return run / "student"


def throughput(model: Any, size: int, device: str, repeats: int = 5) -> float:
    """Median images/s of ``repeats`` timings (each after its own warm-up batch): one timing swings
    several-fold with what else the machine is doing."""
    return statistics.median(images_per_second(model, size, iters=2, device=device) for _ in range(repeats))


def _row(name: str, model: Any, metrics: dict[str, float], device: str) -> dict[str, Any]:
    size = int(getattr(model, "image_size", 224))
    return {"model": name, **{k: metrics[k] for k in metrics if "@" in k or k == "rsum"},
            "params_M": count_params(model) / 1e6, "images_per_s": throughput(model, size, device)}


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    head = f"{'model':<10}" + "".join(f"{c:>10}" for c in cols) + f"{'params(M)':>11}{'img/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<10}" + "".join(f"{r[c]:>10.2f}" for c in cols)
                     + f"{r['params_M']:>11.2f}{r['images_per_s']:>9.1f}")
    return "\n".join(lines)


def run_quickstart(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The four steps (teacher, cache, student, evaluation); returns the table's rows."""
    from distill.core.data.factory import load_dataset
    from distill.pipeline.evaluate import evaluate_model
    from students import load_student
    from teachers import create_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] LiT teacher (frozen MobileNetV2 + MiniLM, trained projections) on {args.data}", flush=True)
    teacher_spec = _run_teacher(args, out)
    print("[2/4] caching teacher outputs", flush=True)
    cache = _run_cache(args, teacher_spec, out)
    print(f"[3/4] distilling the {args.student} student for {args.steps} steps", flush=True)
    student_dir = _run_student(args, teacher_spec, cache, out)
    print(f"[4/4] evaluating on the {args.test_split} split", flush=True)
    test = load_dataset(args.data, split=args.test_split)
    teacher = create_teacher(teacher_spec, device=args.device)
    student = load_student(student_dir, device=args.device)
    rows = [_row("teacher", teacher, evaluate_model(teacher, test, batch_size=64, device=args.device), args.device),
            _row("student", student, evaluate_model(student, test, batch_size=64, device=args.device), args.device)]
    table = format_table(rows)
    print(f"\nRetrieval on {test.name} {args.test_split} ({test.num_images} images, {test.num_captions} captions):\n{table}")
    (out / "quickstart.json").write_text(json.dumps({"data": args.data, "student": args.student, "steps": args.steps,
                                                     "rows": rows}, indent=2))
    print(f"\nresults: {out / 'quickstart.json'}")
    return rows


#: What to do after Ctrl-C (printed by distill.pipeline.cli.run_cli).
INTERRUPTED_HINT = "rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 on success (typed errors propagate to :func:`distill.pipeline.cli.run_cli`)."""
    run_quickstart(parse_args(argv))
    return 0


if __name__ == "__main__":
    from distill.pipeline.cli import cli_main

    cli_main(main)
