"""Does distillation pay? Retrieval quality on Flickr8k (train 6,000 / test 1,000 images, 5 captions each).

Builds two real teachers on the train split only, caches the teacher of record once (many augmented
views + mixup views, their pixels at the student's input size: patient and consistent teaching),
distils students with the toolkit's training API (``train(config)``) and evaluates every model on the
test split with the same protocol (Recall@1/5/10 both directions, RSUM).

Teachers:
    teacher        the teacher of record: ImageNet MobileNetV2 + all-MiniLM-L6-v2 FINE-TUNED contrastively
                   (``teachers.train_lit --mode finetune``, augmentation), then frozen
    teacher_probe  the linear-probe LiT (frozen towers, two trained projections) - the old testbed teacher

Rows (``--rows``; ``core`` = all of these, ``main`` = all but the ``abl_*`` rows; ``_s<k>`` = seed k, seeds from ``--seeds``):
    pruned_distilled_s*   the teacher's first k image blocks (<= 50% of its image FLOPs) and text layers,
                          distilled with the default recipe (multiscale losses + dynamic balancer, all views)
    pruned_no_teacher_s*  the same student and steps, own contrastive loss only (same views as augmentation)
    vit_distilled_s*      ViT-Ti/16 + small text tower from scratch, default recipe, views + mixup views
    vit_no_teacher_s*     the same ViT, own contrastive loss only, same steps and views
    abl_global_only       pruned, global losses (+ own contrastive) only
    abl_fixed             pruned, all losses with fixed equal weights (no balancer)
    abl_dsmd              pruned, the released DSMD balancer formula
    abl_one_view          pruned, only the clean view of each image
Extra rows (``--rows all`` or by name): puma, coma, pmf, mwa (related methods, see README);
teacher_ensemble (the teacher of record + an EfficientNet-Lite0 probe LiT, ``ensemble:`` spec);
tokens_int8, tokens_grid2 (the pruned distilled student on an int8 / 2x2-pooled token cache).

Profiles (``--profile``) set every default; any flag given explicitly overrides it:
    cpu    where the students learn, about two hours on 2 CPU cores, teachers and cache included:
           pruned rows 600 steps of batch 32 (3.2 epochs), ViT-Ti rows 800 steps of batch 64
           (8.5 epochs) at 128 px; rows ``main`` (teachers and the seeded rows; the recipe
           ablations are ``benchmarks/recipe_study.py``'s)
    smoke  150 steps of batch 32 (0.8 epoch) for every row, ``core`` rows: a quick check of the
           pipeline (the ViT rows stay near chance at this budget)
    gpu    all rows, teacher included, in minutes on one H100/H200 (needs the pixel cache)

Every row writes ``<work>/<row>/eval.json``; a finished row is reused when the benchmark is rerun with
the same training config (a row trained with other settings is deleted and retrained).
Results: ``benchmarks/results/quality_flickr8k_<profile>.json`` and ``.md``.

    python benchmarks/quality_flickr8k.py --profile cpu
    python benchmarks/quality_flickr8k.py --profile gpu --device cuda --data /tmp/keep/flickr8k
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import FLICKR8K, RESULTS_DIR, environment, script_main  # noqa: E402
from distill.core.cache.encode import parse_token_mode  # noqa: E402

GLOBAL = ["contrastive_distill", "feature_l1", "cosine", "student_clip"]
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
SEEDED = ["pruned_distilled", "pruned_no_teacher", "vit_distilled", "vit_no_teacher"]
ABLATIONS = ["abl_global_only", "abl_fixed", "abl_dsmd", "abl_one_view"]
EXTRA_ROWS = ["puma", "coma", "pmf", "mwa", "teacher_ensemble", "tokens_int8", "tokens_grid2"]

#: What the two CPU profiles share: teachers, cache, learning rates, student layers.
_CPU: dict[str, Any] = {
    "seeds": "0,1", "workers": 2, "image_size": 160,
    "probe_epochs": 30, "teacher_epochs": 1, "teacher_batch_size": 64, "teacher_lr": 1e-3,
    "teacher_backbone_lr": 1e-4, "teacher_image_blocks": 4, "teacher_text_layers": 2,
    "views": 4, "mixup_views": 2, "pixels": 160, "cache_batch_size": 64,
    "pruned_lr": 5e-4, "vit_lr": 1e-3, "tuned_lr": 1e-3, "init_projections": 512,
    "trainable_image_blocks": 4, "text_layers": 3, "vit_preset": "cpu", "eval_batch_size": 128,
}

#: Every default of a profile; ``None`` in argparse means "take the profile's value".
PROFILES: dict[str, dict[str, Any]] = {
    # The CPU profile, where the students learn: pruned rows 600 steps of batch 32 (3.2 epochs),
    # ViT-Ti rows 800 steps of batch 64 (8.5 epochs); the ablations live in recipe_study.py.
    "cpu": {**_CPU, "rows": "main", "steps": 600, "batch_size": 32, "vit_steps": 800, "vit_batch_size": 64,
            "vit_init_projections": 0},
    # The former CPU profile (150 steps of batch 32, 0.8 epoch): the ViT rows stay near chance; kept
    # for tests and quick checks of the whole pipeline.
    "smoke": {**_CPU, "rows": "core", "steps": 150, "batch_size": 32, "vit_steps": None, "vit_batch_size": None,
              "vit_init_projections": 512},
    "gpu": {
        "rows": "core", "steps": 600, "batch_size": 256, "vit_steps": None, "vit_batch_size": None, "seeds": "0,1",
        "workers": 12, "image_size": 160,
        "probe_epochs": 30, "teacher_epochs": 10, "teacher_batch_size": 256, "teacher_lr": 1e-3,
        "teacher_backbone_lr": 1e-4, "teacher_image_blocks": 19, "teacher_text_layers": 6,
        "views": 24, "mixup_views": 8, "pixels": 160, "cache_batch_size": 512,
        "pruned_lr": 1e-3, "vit_lr": 1e-3, "tuned_lr": 1e-3, "init_projections": 2048, "vit_init_projections": 0,
        "trainable_image_blocks": 0, "text_layers": 3, "vit_preset": "cpu", "eval_batch_size": 512,
    },
}


def losses_layer(names: list[str]) -> dict[str, Any]:
    """A config layer training only the losses ``names`` (default options)."""
    return {"losses": [{"name": n, "cfg": {}} for n in names]}


def seeds_of(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in str(args.seeds).split(",") if s.strip()]


def expand_rows(spec: str, seeds: list[int]) -> list[str]:
    """``main`` (teachers and seeded rows) / ``core`` (+ ablations) / ``all`` / a comma list (a seeded
    row name without ``_s<k>`` means every seed)."""
    main = ["teacher", "teacher_probe"] + [f"{r}_s{s}" for r in SEEDED for s in seeds]
    if spec == "main":
        return main
    if spec in ("core", "all"):
        return main + ABLATIONS + (EXTRA_ROWS if spec == "all" else [])
    out: list[str] = []
    for r in spec.split(","):
        r = r.strip()
        out += [f"{r}_s{s}" for s in seeds] if r in SEEDED else [r]
    return out


class Bench:
    """Builds (or reuses) the teachers, the cache and every row under ``args.work``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._layers: int | None = None

    # -- teachers and cache --------------------------------------------------------------------
    def _lit(self, name: str, **options: Any) -> str:
        """Train the LiT teacher ``name`` once (reused while its settings are unchanged); ``options``
        are :func:`distill.pipeline.lit.train.train_lit` keyword arguments."""
        from distill.pipeline.lit.train import train_lit

        folder, stamp = self.work / name, self.work / f"{name}.settings.json"
        options = {"split": "train", "image_size": self.args.image_size, "device": self.args.device,
                   "workers": self.args.workers, **options}
        if not ((folder / "lit.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == options):
            if folder.exists():
                shutil.rmtree(folder)
            start = time.perf_counter()
            train_lit(self.args.data, str(folder), **options)
            stamp.write_text(json.dumps(options))
            (self.work / f"{name}.seconds").write_text(f"{time.perf_counter() - start:.1f}")
        return f"lit:{folder}"

    def probe_teacher(self) -> str:
        return self._lit("teacher_probe", mode="probe", epochs=self.args.probe_epochs)

    def ensemble_teacher(self) -> str:
        """The teacher of record and an EfficientNet-Lite0 probe LiT, similarities averaged."""
        effnet = self._lit("teacher_effnet_probe", mode="probe", backbone="efficientnet_lite0",
                           epochs=self.args.probe_epochs)
        return f"ensemble:{self.teacher()}+{effnet}"

    def teacher(self) -> str:
        """The teacher of record: the probe teacher's towers fine-tuned (their last blocks/layers)."""
        a = self.args
        probe = self.probe_teacher().split(":", 1)[1]
        return self._lit("teacher_finetuned", mode="finetune", init=probe, epochs=a.teacher_epochs,
                         batch_size=a.teacher_batch_size, lr=a.teacher_lr, backbone_lr=a.teacher_backbone_lr,
                         trainable_image_blocks=a.teacher_image_blocks,
                         trainable_text_layers=a.teacher_text_layers, seed=0)

    def cache(self, name: str = "cache", **storage: Any) -> Path:
        """The teacher's cache: clean view + random crops + mixup views, pixels at the student's size
        (``storage``: other :class:`CacheSettings` fields of a variant cache, e.g. ``dtype="int8"``)."""
        from distill.core.cache.encode import parse_token_mode
        from distill.core.data.pixels import PixelSettings
        from distill.pipeline.cache.run import run_cache
        from distill.pipeline.cache.settings import CacheJob, CacheSettings

        a, out = self.args, self.work / name
        settings = CacheSettings(**{"image_tokens": parse_token_mode("full"), "views": a.views,
                                    "mixup_views": a.mixup_views,
                                    "pixels": PixelSettings(a.pixels) if a.pixels else None, **storage})
        job = CacheJob(self.teacher(), a.data, out, split="train", device=a.device, num_workers=a.workers,
                       batch_size=a.cache_batch_size, overwrite=True)
        stamp_path, stamp = self.work / f"{name}.settings.json", {"teacher": job.teacher, "data": job.data,
                                                                  "settings": settings.key()}
        if not ((out / "manifest.json").is_file() and stamp_path.is_file()
                and json.loads(stamp_path.read_text()) == stamp):
            result = run_cache(settings, job)
            stamp_path.write_text(json.dumps(stamp))
            (self.work / f"{name}.seconds").write_text(f"{result.seconds:.1f}")
        return out

    def image_layers(self) -> int:
        from students.pruned import half_compute_layers

        if self._layers is None:
            self._layers = half_compute_layers(self.teacher())
        return self._layers

    # -- students ------------------------------------------------------------------------------
    def pruned_layer(self, student: str = "pruned", teacher_init: bool = True) -> dict[str, Any]:
        """The config layer of the pruned student (:func:`pruned_student_recipe`), or of a tuned one."""
        from distill.pipeline.recipes import pruned_student_recipe

        a = self.args
        if student != "pruned":  # tuned students are built from the teacher's full towers
            return {"student": {"name": student, "teacher": self.teacher()}, "train": {"lr": a.tuned_lr}}
        return pruned_student_recipe(self.teacher(), self.image_layers(), a.text_layers, a.trainable_image_blocks or None,
                                     lr=a.pruned_lr, init_projections=a.init_projections if teacher_init else 0)

    def vit_layer(self, teacher_init: bool = True) -> dict[str, Any]:
        """The ViT student's layer: its LR and budget (``vit_steps`` / ``vit_batch_size``, default the
        pruned rows'), the least-squares start on distilled rows when ``vit_init_projections``."""
        a = self.args
        train: dict[str, Any] = {"lr": a.vit_lr, "steps": a.vit_steps or a.steps,
                                 "batch_size": a.vit_batch_size or a.batch_size}
        if teacher_init and a.vit_init_projections:
            train["init_projections"] = a.vit_init_projections
        return {"student": {"name": "vit"}, "train": train}

    def train_config(self, row: str, cache: Path, *layers: dict[str, Any], preset: str = "cpu",
                     seed: int = 0) -> dict[str, Any]:
        """The resolved training config of ``row``: ``preset``, the run's data and budget, ``layers``."""
        from distill.pipeline.train.config import resolve_config

        a = self.args
        run = {"data": {"cache": str(cache), "path": a.data, "split": "train", "num_workers": a.workers},
               "out": str(self.work / row), "device": a.device, "seed": seed,
               "train": {"steps": a.steps, "batch_size": a.batch_size}}
        return resolve_config(preset, layers=[run, *layers])

    def train(self, row: str, config: dict[str, Any]) -> Path:
        """Train ``row`` (resuming an interrupted run). ``<row>/config.json`` records the config; a
        row trained with other settings is deleted and retrained, never silently reused."""
        from distill.pipeline.train import main as train_student

        run, stamp = self.work / row, self.work / row / "config.json"
        same = stamp.is_file() and canonical_config(json.loads(stamp.read_text())) == canonical_config(config)
        if same and (run / "student" / "student.json").is_file():
            return run / "student"
        if run.exists() and not same:
            print(f"[{row}] trained with other settings: deleting and retraining {run}", flush=True)
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(config))
        start = time.perf_counter()
        summary = train_student.train(config, resume="auto").to_dict()
        summary["wall_seconds"] = time.perf_counter() - start
        (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return run / "student"

    def evaluate(self, row: str, build: Callable[[], Any]) -> dict[str, Any]:
        """Evaluate ``build()`` on the test split (reusing ``<row>/eval.json``)."""
        from distill.core.data.factory import load_dataset
        from distill.pipeline.evaluate import evaluate_model
        from distill.core.profile import count_params, image_gflops

        path = self.work / row / "eval.json"
        if path.is_file():
            return json.loads(path.read_text())
        model = build()
        test = load_dataset(self.args.data, split="test")
        start = time.perf_counter()
        metrics = evaluate_model(model, test, batch_size=self.args.eval_batch_size, device=self.args.device,
                                 num_workers=self.args.workers)
        size = int(model.image_size)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = {"row": row, **{k: metrics[k] for k in METRICS}, "eval_seconds": time.perf_counter() - start,
                  "params_M": count_params(model) / 1e6, "trainable_M": trainable / 1e6,
                  "image_size": size, "image_gflops": image_gflops(model, size, self.args.device),
                  "test_images": test.num_images, "test_captions": test.num_captions}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return result

    def student_row(self, row: str, *layers: dict[str, Any], preset: str = "cpu", seed: int = 0,
                    cache: Path | None = None) -> dict[str, Any]:
        from students import load_student

        cache = cache or self.cache()
        folder = self.train(row, self.train_config(row, cache, *layers, preset=preset, seed=seed))
        result = self.evaluate(row, lambda: load_student(folder, device=self.args.device))
        log = self.work / row / "summary.json"
        student = json.loads((folder / "student.json").read_text())["config"]
        return {**result, "student": student, **train_speed(self.work / row),
                **({"train": json.loads(log.read_text())} if log.is_file() else {})}

    # -- rows ----------------------------------------------------------------------------------
    def row_table(self) -> dict[str, Callable[[int], dict[str, Any]]]:
        """Row name (without seed) -> builder taking the seed."""
        from teachers import create_teacher

        vit_preset = self.args.vit_preset
        no_teacher = losses_layer(["student_clip"])
        return {
            "teacher": lambda s: self.evaluate("teacher", lambda: create_teacher(self.teacher(), self.args.device)),
            "teacher_probe": lambda s: self.evaluate("teacher_probe",
                                                     lambda: create_teacher(self.probe_teacher(), self.args.device)),
            "pruned_distilled": lambda s: self.student_row(f"pruned_distilled_s{s}", self.pruned_layer(), seed=s),
            "pruned_no_teacher": lambda s: self.student_row(f"pruned_no_teacher_s{s}",
                                                            self.pruned_layer(teacher_init=False), no_teacher, seed=s),
            "vit_distilled": lambda s: self.student_row(f"vit_distilled_s{s}", self.vit_layer(), preset=vit_preset,
                                                        seed=s),
            "vit_no_teacher": lambda s: self.student_row(f"vit_no_teacher_s{s}", self.vit_layer(teacher_init=False),
                                                         no_teacher, preset=vit_preset, seed=s),
            "abl_global_only": lambda s: self.student_row("abl_global_only", self.pruned_layer(), losses_layer(GLOBAL)),
            "abl_fixed": lambda s: self.student_row("abl_fixed", self.pruned_layer(),
                                                    {"balancer": {"name": "fixed", "cfg": {}}}),
            "abl_dsmd": lambda s: self.student_row("abl_dsmd", self.pruned_layer(),
                                                   {"balancer": {"name": "dsmd", "cfg": {}}}),
            "abl_one_view": lambda s: self.student_row("abl_one_view", self.pruned_layer(),
                                                       {"data": {"use_views": False}}),
            "teacher_ensemble": lambda s: self.evaluate(
                "teacher_ensemble", lambda: create_teacher(self.ensemble_teacher(), self.args.device)),
            "tokens_int8": lambda s: self.student_row("tokens_int8", self.pruned_layer(),
                                                      cache=self.cache("cache_int8", dtype="int8")),
            "tokens_grid2": lambda s: self.student_row("tokens_grid2", self.pruned_layer(),
                                                       cache=self.cache("cache_grid2", image_tokens=parse_token_mode("grid:2"))),
            "puma": lambda s: self.student_row("puma", self.pruned_layer(), preset="puma"),
            "coma": lambda s: self.student_row("coma", self.pruned_layer(), self.coma_layer()),
            "pmf": lambda s: self.student_row("pmf", self.pruned_layer("pmf")),
            "mwa": lambda s: self.student_row("mwa", self.pruned_layer("mwa")),
        }

    def run_row(self, row: str) -> dict[str, Any]:
        table = self.row_table()
        base, _, seed = row.rpartition("_s")
        if base in SEEDED and seed.isdigit():
            name, s = base, int(seed)
        else:
            name, s = row, 0
        if name not in table:
            raise SystemExit(f"error: unknown row {row!r}; rows: {', '.join(table)} (seeded: {', '.join(SEEDED)})")
        start = time.perf_counter()
        result = table[name](s)
        result["row"] = row
        print(f"[{row}] rsum {result['rsum']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return result

    def coma_layer(self) -> dict[str, Any]:
        """CoMa: a first stage of a fifth of the steps trains only ``coma_reconstruct`` (fixed
        weight), then the default losses and balancer."""
        n = max(1, self.args.steps // 5)
        return {"stages": [{"name": "CoMa warm-up", "steps": n, "losses": [{"name": "coma_reconstruct", "cfg": {}}],
                            "balancer": {"name": "fixed", "cfg": {}}}, {}]}


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a ``vit`` student written out as its full architecture, so that a preset name
    (``preset: vit-ti16-128-d6``) and the same numbers written field by field compare equal."""
    from dataclasses import asdict

    from students.vit_dual import VIT_PRESETS, ViTDualConfig

    student = dict(config.get("student") or {})
    if student.get("name") != "vit":
        return config
    name, preset = student.pop("name"), student.pop("preset", None)
    try:
        arch = asdict(ViTDualConfig(**{**VIT_PRESETS.get(preset or "vit-s16", {}), **student}))
    except (TypeError, ValueError):  # not a valid architecture: compare as written
        return config
    return {**config, "student": {"name": name, **arch}}


# ---------------------------------------------------------------------------------------- report
def train_speed(run: Path) -> dict[str, Any]:
    """``train_seconds`` (the run's wall time: setup, training and checkpoints), ``train_steps`` and
    ``samples_per_s``: the median per-step rate of the training log, steps that measured gradient
    shares (one extra backward per term) left out."""
    summary, log = run / "summary.json", run / "train_log.jsonl"
    out: dict[str, Any] = {}
    if summary.is_file():
        s = json.loads(summary.read_text())
        out.update(train_seconds=s.get("wall_seconds", s.get("seconds")), train_steps=s.get("steps"))
    if log.is_file():
        recs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "train" and "samples_per_s" in r]
        plain = [r for r in recs if not any(k.startswith("grad_share/") for k in r)] or recs  # all measured: all
        if plain:
            out["samples_per_s"] = statistics.median(r["samples_per_s"] for r in plain)
    return out


def aggregate(by: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and spread (max - min) of RSUM over the seeds of every seeded row that was run."""
    out = {}
    for name in SEEDED:
        runs = sorted((r for r in by if r.startswith(name + "_s") and r[len(name) + 2:].isdigit()))
        if runs:
            vals = [by[r]["rsum"] for r in runs]
            out[name] = {"rows": runs, "rsum": vals, "mean": statistics.fmean(vals), "spread": max(vals) - min(vals)}
    return out


def targets(by: dict[str, dict[str, Any]], agg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, evaluated on whichever rows were run (means over seeds)."""
    out: dict[str, Any] = {}
    if "vit_distilled" in agg and "vit_no_teacher" in agg:
        ratio = agg["vit_distilled"]["mean"] / max(agg["vit_no_teacher"]["mean"], 1e-9)
        out["vit_distilled_vs_no_teacher_rsum"] = {"value": ratio, "target": 2.0, "met": ratio >= 2.0}
    if "pruned_distilled" in agg:
        pruned = agg["pruned_distilled"]["mean"]
        if "teacher" in by:
            ratio = pruned / by["teacher"]["rsum"]
            out["pruned_vs_teacher_rsum"] = {"value": ratio, "target": 0.9, "met": ratio >= 0.9}
            row = by[agg["pruned_distilled"]["rows"][0]]
            flops = row["image_gflops"] / by["teacher"]["image_gflops"]
            out["pruned_image_flops_vs_teacher"] = {"value": flops, "target": 0.5, "met": flops <= 0.5}
        if "pruned_no_teacher" in agg:
            ratio = pruned / max(agg["pruned_no_teacher"]["mean"], 1e-9)
            out["pruned_distilled_vs_no_teacher_rsum"] = {"value": ratio, "target": 1.10, "met": ratio >= 1.10}
        spread, seeds = agg["pruned_distilled"]["spread"], len(agg["pruned_distilled"]["rsum"])
        for abl in (r for r in ABLATIONS if r in by):
            margin = pruned - by[abl]["rsum"]
            if seeds < 2:  # one seed has no spread: the margin is reported, the target not judged
                out[f"full_vs_{abl}"] = {"value": margin, "target": "> seed spread (needs >= 2 seeds)", "met": None}
            else:
                out[f"full_vs_{abl}"] = {"value": margin, "target": f"> seed spread {spread:.2f}", "met": margin > spread}
    alone = [agg[r]["mean"] for r in ("pruned_no_teacher", "vit_no_teacher") if r in agg]
    if "teacher" in by and alone:
        gap = by["teacher"]["rsum"] - max(alone)
        out["teacher_stronger_than_students_alone"] = {"value": gap, "target": "> 0", "met": gap > 0}
    return out


def markdown(rows: list[dict[str, Any]], agg: dict[str, dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    head = ("| row | " + " | ".join(METRICS) + " | % teacher RSUM | params (M) | trainable (M) | GFLOPs/img"
            " | % teacher GFLOPs | steps | train s | samples/s |")
    lines = [head, "|" + "---|" * (len(METRICS) + 9)]
    for r in rows:
        share = f"{100 * r['rsum'] / teacher['rsum']:.1f}" if teacher else "-"
        flops = f"{100 * r['image_gflops'] / teacher['image_gflops']:.0f}" if teacher else "-"
        speed = " | ".join(f"{r[k]:.0f}" if isinstance(r.get(k), (int, float)) else "-"
                           for k in ("train_steps", "train_seconds", "samples_per_s"))
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[m]:.2f}" for m in METRICS)
                     + f" | {share} | {r['params_M']:.2f} | {r['trainable_M']:.2f} | {r['image_gflops']:.3f} | {flops}"
                     f" | {speed} |")
    if agg:
        lines += ["", "| row (seeds) | RSUM mean | spread (max-min) | RSUM per seed |", "|---|---|---|---|"]
        lines += [f"| {k} ({len(v['rsum'])}) | {v['mean']:.2f} | {v['spread']:.2f} | "
                  + ", ".join(f"{x:.2f}" for x in v["rsum"]) + " |" for k, v in agg.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="default settings (see above)")
    p.add_argument("--data", default=str(FLICKR8K), help="Flickr8k folder (captions.tsv + splits/)")
    p.add_argument("--work", default=None, help="working folder (default runs/quality_flickr8k_<profile>)")
    p.add_argument("--rows", default=None, help="comma list of rows, 'main', 'core' or 'all' (default: the profile's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/quality_flickr8k_<profile>.json)")
    int_flags = ("steps", "batch_size", "workers", "image_size", "probe_epochs", "teacher_epochs",
                 "teacher_batch_size", "teacher_image_blocks", "teacher_text_layers", "views", "mixup_views",
                 "pixels", "cache_batch_size", "init_projections", "trainable_image_blocks", "text_layers",
                 "eval_batch_size", "vit_steps", "vit_batch_size", "vit_init_projections")
    for name in int_flags:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("teacher_lr", "teacher_backbone_lr", "pruned_lr", "vit_lr", "tuned_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--seeds", default=None, help="comma list of seeds for the seeded rows")
    p.add_argument("--vit-preset", default=None, help="training preset of the ViT rows")
    args = p.parse_args(argv)
    for key, value in PROFILES[args.profile].items():
        if key != "rows" and getattr(args, key) is None:
            setattr(args, key, value)
    args.work = args.work or f"runs/quality_flickr8k_{args.profile}"
    args.rows = args.rows or PROFILES[args.profile]["rows"]
    args.out = args.out or RESULTS_DIR / f"quality_flickr8k_{args.profile}.json"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (Path(args.data) / "captions.tsv").is_file():
        raise SystemExit(f"error: Flickr8k not found at {args.data} (captions.tsv + splits/); pass --data")
    rows = expand_rows(args.rows, seeds_of(args))
    bench = Bench(args)
    started = time.perf_counter()
    results = [bench.run_row(r) for r in rows]
    by = {r["row"]: r for r in results}
    agg = aggregate(by)
    stage_seconds = {p.stem: float(p.read_text()) for p in Path(args.work).glob("*.seconds")}
    report = {"benchmark": "quality_flickr8k", "profile": args.profile,
              "environment": environment(torch.device(args.device)),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": time.perf_counter() - started, "stage_seconds": stage_seconds,
              "rows": results, "seeds": agg, "targets": targets(by, agg)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    table = markdown(results, agg, by.get("teacher"))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    parts = [f"{k} {v['mean']:.1f}±{v['spread'] / 2:.1f}" for k, v in agg.items()]
    parts += [f"{r} {by[r]['rsum']:.1f}" for r in by if not any(r.startswith(s + "_s") for s in SEEDED)]
    verdict = {True: "met", False: "missed", None: "not judged"}
    met = ", ".join(f"{k}={v['value']:.2f} ({verdict[v['met']]})" for k, v in report["targets"].items())
    print(f"quality_flickr8k[{args.profile}]: RSUM {'; '.join(parts)} | {met}")
    return report


if __name__ == "__main__":
    script_main(main)
