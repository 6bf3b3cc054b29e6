"""Retrieval quality on Flickr8k (train 6,000 / test 1,000 images, 5 captions each).

Builds the real LiT teacher (ImageNet MobileNetV2 + all-MiniLM-L6-v2, projections trained on the
train split only), caches its outputs, distils students with the toolkit's CLIs and evaluates every
model on the test split with the same protocol. Rows (``--rows``, default: all core rows):

    teacher          the LiT teacher itself
    pruned_full      layer-pruned student (~half the teacher's image FLOPs), full multiscale loss + balancer
    global_only      pruned student, global losses (+ own contrastive) only, balancer
    global_token     ... + token-level loss
    global_relation  ... + relation-level losses
    all_fixed        all levels, fixed equal weights (no balancer)
    pruned_no_teacher pruned student, own contrastive loss only (no teacher)
    views            pruned_full on a cache with 2 views per image (clean + an augmented crop/flip)
    vit_full         small ViT student + small text transformer from scratch, full loss + balancer
    vit_no_teacher   the same ViT student, own contrastive loss only, same steps
    pruned_random_init  pruned_full with randomly initialised projection heads (extra row; the
                     distilled pruned rows start from a least-squares fit to the teacher, --init-projections)
    pruned_full_x4   pruned_full trained 4x as many steps       (extra row)
    pruned_no_teacher_x4  pruned_no_teacher trained 4x as many steps (extra row)
    tokens_int8      pruned_full on an int8 token cache      (extra row)
    tokens_grid2     pruned_full on a 2x2-pooled token cache (extra row)
    puma, coma, pmf, mwa   methods from related work (extra rows; see README)

Every row writes ``<work>/<row>/eval.json``; a finished row is reused when the benchmark is rerun
(delete its folder to redo it). Results: ``benchmarks/results/quality_flickr8k.json`` and ``.md``.

    python benchmarks/quality_flickr8k.py                          # ~1 h on 2 CPU cores
    python benchmarks/quality_flickr8k.py --rows teacher,pruned_full --steps 50
    python benchmarks/quality_flickr8k.py --device cuda --steps 3000 --batch-size 256 --rows all
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import FLICKR8K, RESULTS_DIR, environment  # noqa: E402

GLOBAL = ["contrastive_distill", "feature_l1", "cosine", "student_clip"]
TOKEN = ["token"]
RELATION = ["relation_kl", "triplet"]
ALL = GLOBAL[:3] + TOKEN + RELATION + GLOBAL[3:]
CORE_ROWS = ["teacher", "pruned_full", "pruned_no_teacher", "vit_full", "vit_no_teacher", "global_only",
             "global_token", "global_relation", "all_fixed", "views"]
EXTRA_ROWS = ["pruned_random_init", "puma", "coma", "mwa", "pmf", "tokens_int8", "tokens_grid2", "pruned_full_x4", "pruned_no_teacher_x4"]
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


def losses_override(names: list[str]) -> str:
    return "losses=[" + ", ".join(f"{{name: {n}, cfg: {{}}}}" for n in names) + "]"


class Bench:
    """Builds (or reuses) the teacher, the caches and every row under ``args.work``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.teacher_spec = f"lit:{self.work / 'teacher'}"
        self._layers: int | None = None

    # -- shared stages -----------------------------------------------------------------------
    def teacher(self) -> str:
        from teachers import train_lit

        if not (self.work / "teacher" / "lit.json").is_file():
            train_lit.main(["--data", self.args.data, "--split", "train", "--out", str(self.work / "teacher"),
                            "--epochs", str(self.args.teacher_epochs), "--image-size", str(self.args.image_size),
                            "--device", self.args.device, "--workers", str(self.args.workers)])
        return self.teacher_spec

    def cache(self, name: str = "cache", *extra: str) -> Path:
        from distill import cache_teacher

        out = self.work / name
        if not (out / "manifest.json").is_file():
            cache_teacher.main(["--teacher", self.teacher(), "--data", self.args.data, "--split", "train",
                                "--out", str(out), "--image-tokens", "full", "--device", self.args.device,
                                "--num-workers", str(self.args.workers), *extra])
        return out

    def image_layers(self) -> int:
        from students.pruned import half_compute_layers

        if self._layers is None:
            self._layers = half_compute_layers(self.teacher())
        return self._layers

    # -- students ------------------------------------------------------------------------------
    def pruned_args(self, student: str = "pruned", teacher_init: bool = True) -> list[str]:
        k = self.image_layers()
        sets = [f"student.teacher={self.teacher()}", f"student.image_layers={k}",
                f"student.text_layers={self.args.text_layers}", f"student.frozen_image_layers={max(0, k - self.args.trainable_image_blocks)}",
                "student.freeze_text_embeddings=true", f"train.lr={self.args.pruned_lr}"]
        if teacher_init:
            sets += self.init_sets()
        if student != "pruned":  # tuned students are built from the teacher's full towers
            sets = [f"student.teacher={self.teacher()}", f"train.lr={self.args.tuned_lr}"]
        return ["--student", student, *[a for s in sets for a in ("--set", s)]]

    def init_sets(self) -> list[str]:
        """``--set`` values of the least-squares projection start (distilled rows only)."""
        return [f"train.init_projections={self.args.init_projections}"] if self.args.init_projections else []

    def train_argv(self, row: str, cache: Path, student_args: list[str], *sets: str, preset: str = "cpu",
                   steps: int | None = None) -> list[str]:
        """The ``train_student`` command line of ``row``."""
        steps = steps or self.args.steps
        return ["--preset", preset, "--cache", str(cache), "--data", self.args.data, "--split", "train",
                "--out", str(self.work / row), "--steps", str(steps), "--batch-size", str(self.args.batch_size),
                "--device", self.args.device, "--num-workers", str(self.args.workers), "--resume", "auto",
                "--seed", str(self.args.seed), "--set", f"train.warmup_steps={max(1, steps // 10)}",
                *student_args, *[a for s in sets for a in ("--set", s)]]

    def train(self, row: str, argv: list[str]) -> Path:
        """Train ``row`` (resuming an interrupted run). ``<row>/argv.json`` records the command line; a
        row trained with other settings (e.g. another pruned depth) is deleted and retrained, never
        silently reused."""
        from distill import train_student

        run, stamp = self.work / row, self.work / row / "argv.json"
        same = stamp.is_file() and json.loads(stamp.read_text()) == argv
        if same and (run / "student" / "student.json").is_file():
            return run / "student"
        if run.exists() and not same:
            print(f"[{row}] trained with other settings: deleting and retraining {run}", flush=True)
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(argv))
        start = time.perf_counter()
        summary = train_student.main(argv)
        summary["wall_seconds"] = time.perf_counter() - start
        (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return run / "student"

    def evaluate(self, row: str, build: Callable[[], Any]) -> dict[str, Any]:
        """Evaluate ``build()`` on the test split (reusing ``<row>/eval.json``)."""
        from distill.data import load_dataset
        from distill.evaluate import evaluate_model
        from distill.profile import count_params, image_gflops, images_per_second

        path = self.work / row / "eval.json"
        if path.is_file():
            return json.loads(path.read_text())
        model = build()
        test = load_dataset(self.args.data, split="test")
        start = time.perf_counter()
        metrics = evaluate_model(model, test, batch_size=64, device=self.args.device, num_workers=self.args.workers)
        size = int(model.image_size)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = {"row": row, **{k: metrics[k] for k in METRICS}, "eval_seconds": time.perf_counter() - start,
                  "params_M": count_params(model) / 1e6, "trainable_M": trainable / 1e6,
                  "image_size": size, "image_gflops": image_gflops(model, size, self.args.device),
                  "images_per_s": images_per_second(model, size, device=self.args.device),
                  "test_images": test.num_images, "test_captions": test.num_captions}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return result

    def student_row(self, row: str, cache: Path, student_args: list[str], *sets: str, preset: str = "cpu",
                    steps: int | None = None) -> dict[str, Any]:
        from students import load_student

        folder = self.train(row, self.train_argv(row, cache, student_args, *sets, preset=preset, steps=steps))
        result = self.evaluate(row, lambda: load_student(folder, device=self.args.device))
        log = self.work / row / "summary.json"
        student = json.loads((folder / "student.json").read_text())["config"]
        return {**result, "student": student, **({"train": json.loads(log.read_text())} if log.is_file() else {})}

    # -- rows ----------------------------------------------------------------------------------
    def run_row(self, row: str) -> dict[str, Any]:
        from teachers import build_teacher

        vit = ["--student", "vit"]
        table: dict[str, Callable[[], dict[str, Any]]] = {
            "teacher": lambda: self.evaluate("teacher", lambda: build_teacher(self.teacher(), self.args.device)),
            "pruned_full": lambda: self.student_row("pruned_full", self.cache(), self.pruned_args()),
            "global_only": lambda: self.student_row("global_only", self.cache(), self.pruned_args(),
                                                    losses_override(GLOBAL)),
            "global_token": lambda: self.student_row("global_token", self.cache(), self.pruned_args(),
                                                     losses_override(GLOBAL + TOKEN)),
            "global_relation": lambda: self.student_row("global_relation", self.cache(), self.pruned_args(),
                                                        losses_override(GLOBAL + RELATION)),
            "all_fixed": lambda: self.student_row("all_fixed", self.cache(), self.pruned_args(),
                                                  "balancer={name: fixed, cfg: {}}"),
            "pruned_no_teacher": lambda: self.student_row("pruned_no_teacher", self.cache(),
                                                          self.pruned_args(teacher_init=False),
                                                          losses_override(["student_clip"])),
            "views": lambda: self.student_row("views", self.cache("cache_views2", "--views", "2"), self.pruned_args()),
            "vit_full": lambda: self.student_row("vit_full", self.cache(), vit, f"train.lr={self.args.vit_lr}",
                                                 *self.init_sets()),
            "vit_no_teacher": lambda: self.student_row("vit_no_teacher", self.cache(), vit, f"train.lr={self.args.vit_lr}",
                                                       losses_override(["student_clip"])),
            "pruned_random_init": lambda: self.student_row("pruned_random_init", self.cache(),
                                                           self.pruned_args(teacher_init=False)),
            "pruned_full_x4": lambda: self.student_row("pruned_full_x4", self.cache(), self.pruned_args(),
                                                       steps=4 * self.args.steps),
            "pruned_no_teacher_x4": lambda: self.student_row("pruned_no_teacher_x4", self.cache(),
                                                             self.pruned_args(teacher_init=False),
                                                             losses_override(["student_clip"]), steps=4 * self.args.steps),
            "tokens_int8": lambda: self.student_row("tokens_int8", self.cache("cache_int8", "--dtype", "int8"),
                                                    self.pruned_args()),
            "tokens_grid2": lambda: self.student_row("tokens_grid2", self.cache("cache_grid2", "--image-tokens", "grid:2"),
                                                     self.pruned_args()),
            "puma": lambda: self.student_row("puma", self.cache(), self.pruned_args(), preset="puma"),
            "coma": lambda: self.student_row("coma", self.cache(), self.pruned_args(), *self.coma_sets()),
            "pmf": lambda: self.student_row("pmf", self.cache(), self.pruned_args("pmf")),
            "mwa": lambda: self.student_row("mwa", self.cache(), self.pruned_args("mwa")),
        }
        if row not in table:
            raise SystemExit(f"error: unknown row {row!r}; rows: {', '.join(table)}")
        start = time.perf_counter()
        result = table[row]()
        print(f"[{row}] rsum {result['rsum']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return result

    def coma_sets(self) -> list[str]:
        n = max(1, self.args.steps // 5)
        return [f"train.warmup_stage={{steps: {n}, losses: [{{name: coma_reconstruct, cfg: {{}}}}]}}"]


def markdown(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    head = ("| row | " + " | ".join(METRICS) + " | % teacher RSUM | params (M) | trainable (M) | GFLOPs/img"
            " | % teacher GFLOPs | img/s |")
    lines = [head, "|" + "---|" * (len(METRICS) + 7)]
    for r in rows:
        share = f"{100 * r['rsum'] / teacher['rsum']:.1f}" if teacher else "-"
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[m]:.2f}" for m in METRICS)
                     + f" | {share} | {r['params_M']:.2f} | {r['trainable_M']:.2f} | {r['image_gflops']:.3f}"
                     f" | {100 * r['image_gflops'] / teacher['image_gflops'] if teacher else 0:.0f}"
                     f" | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def targets(by: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, evaluated on whichever rows were run."""
    out: dict[str, Any] = {}
    if "teacher" in by and "pruned_full" in by:
        ratio = by["pruned_full"]["rsum"] / by["teacher"]["rsum"]
        out["pruned_vs_teacher_rsum"] = {"value": ratio, "target": 0.9, "met": ratio >= 0.9}
    for student, base in (("vit_full", "vit_no_teacher"), ("pruned_full", "pruned_no_teacher")):
        if student in by and base in by:
            ratio = by[student]["rsum"] / max(by[base]["rsum"], 1e-9)
            out[f"{student}_vs_{base}_rsum"] = {"value": ratio, "target": 2.0, "met": ratio >= 2.0}
    ablations = [r for r in ("global_only", "global_token", "global_relation", "all_fixed") if r in by]
    if "pruned_full" in by and ablations:
        best = max(ablations, key=lambda r: by[r]["rsum"])
        out["full_vs_best_ablation"] = {"best_ablation": best, "value": by["pruned_full"]["rsum"] - by[best]["rsum"],
                                        "target": 0.0, "met": by["pruned_full"]["rsum"] >= by[best]["rsum"]}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(FLICKR8K), help="Flickr8k folder (captions.tsv + splits/)")
    p.add_argument("--work", default="runs/quality_flickr8k", help="working folder (teacher, caches, runs)")
    p.add_argument("--rows", default="core", help="comma list of rows, 'core' or 'all'")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per student")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=160, help="teacher (and pruned student) input size")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--trainable-image-blocks", type=int, default=4,
                   help="pruned student: train only the last N kept image blocks (the rest stay frozen)")
    p.add_argument("--text-layers", type=int, default=3, help="pruned student: teacher text layers kept (of 6)")
    p.add_argument("--pruned-lr", type=float, default=5e-4)
    p.add_argument("--vit-lr", type=float, default=5e-4)
    p.add_argument("--tuned-lr", type=float, default=1e-3)
    p.add_argument("--init-projections", type=int, default=512,
                   help="distilled pruned and ViT rows: least-squares start of the projection heads on this many "
                        "samples (train.init_projections; 0: random init; never on the no-teacher rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_flickr8k.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (Path(args.data) / "captions.tsv").is_file():
        raise SystemExit(f"error: Flickr8k not found at {args.data} (captions.tsv + splits/); pass --data")
    rows = {"core": CORE_ROWS, "all": CORE_ROWS + EXTRA_ROWS}.get(args.rows) or args.rows.split(",")
    bench = Bench(args)
    started = time.perf_counter()
    results = [bench.run_row(r) for r in rows]
    by = {r["row"]: r for r in results}
    report = {"benchmark": "quality_flickr8k", "environment": environment(torch.device(args.device)),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": time.perf_counter() - started,
              "rows": results, "targets": targets(by)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    table = markdown(results, by.get("teacher"))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    parts = [f"{r['row']} {r['rsum']:.1f}" for r in results]
    met = ", ".join(f"{k}={v['value']:.2f} ({'met' if v['met'] else 'missed'})" for k, v in report["targets"].items())
    print(f"quality_flickr8k: RSUM {'; '.join(parts)} | {met}")
    return report


if __name__ == "__main__":
    main()
