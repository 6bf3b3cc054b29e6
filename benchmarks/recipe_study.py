"""Which parts of the recipe pay? Every term, balancer and view policy against the student trained
alone, on Flickr8k (train 6,000 / test 1,000 images), at the quality benchmark's CPU budget.

Uses the teachers and the cache of ``benchmarks/quality_flickr8k.py --profile cpu`` (same work
folder; built on first use) and trains each row with the toolkit's ``train(config)``. A row is named
``<student>.<terms>.<balancer>.<views>.<budget>.s<seed>``:

    student   vit (ViT-Ti/16 from scratch, 128 px) | pruned (the teacher's first blocks)
    terms     clip_only (no teacher: the student's own contrastive loss) | cd (contrastive_distill +
              student_clip) | cd_cos (+ cosine) | cd_cos_l1 (+ feature_l1) | cd_cos_rel (+ relation_kl)
              | cd_cos_tok (+ token) | all7 (the paper's seven terms) | default (the library's
              default loss set, whatever it is)
    balancer  fixed | dynamic (loss-value references: scale value) | dynamic_ra (dynamic, reference
              after the transient: ref_after 200) | dynamic_grad (dynamic_ra with gradient-norm
              references: scale grad) |
              dsmd | uncertainty | gradnorm | default (the library's default)
    views     v1 (the clean view only) | v4 (+ 3 random crops) | v6 (+ 2 mixup views: every cached view)
    budget    full (the CPU profile: vit 800 steps of batch 64, pruned 600 of batch 32) | half |
              eqtime (clip_only only: the wall time of the same seed's default full row, at the
              no-teacher row's own measured step time)

Every row logs each term's signed share of the gradient every ``--grad-share-every`` steps
(``train.grad_share_every``), reported as the mean over the run; ``samples_per_s`` leaves those
steps out. Rows are resumable (``<work>/study/<row>``) and the results accumulate in the JSON,
written after every row, so the study can run across sessions (``--stop-after`` starts no new row
after that many seconds). Flags it does not know go to the quality benchmark (``--vit-steps``,
``--views``, ...): they change the teachers, the cache or the budget of every row.

Plans (``--plan``): ``screen`` (half budget, seed 0, one change at a time), ``confirm`` (full
budget, seeds 0 and 1: the default, the three best distilled screen recipes of each student,
clip_only at equal steps and at equal time), or a comma list of row names.

    python benchmarks/recipe_study.py --plan screen
    python benchmarks/recipe_study.py --plan confirm
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, environment, script_main  # noqa: E402
from benchmarks.quality_flickr8k import Bench, canonical_config, parse_args as quality_args, train_speed  # noqa: E402

SEVEN = ["contrastive_distill", "feature_l1", "cosine", "token", "relation_kl", "triplet", "student_clip"]
TERMS: dict[str, list[str] | None] = {
    "clip_only": ["student_clip"],
    "cd": ["contrastive_distill", "student_clip"],
    "cd_cos": ["contrastive_distill", "cosine", "student_clip"],
    "cd_cos_l1": ["contrastive_distill", "cosine", "feature_l1", "student_clip"],
    "cd_cos_rel": ["contrastive_distill", "cosine", "relation_kl", "student_clip"],
    "cd_cos_tok": ["contrastive_distill", "cosine", "token", "student_clip"],
    "all7": SEVEN,
    "default": None,  # the library's default loss set
}
BALANCERS: dict[str, dict[str, Any] | None] = {
    "fixed": {"name": "fixed", "cfg": {}},
    "dynamic": {"name": "dynamic", "cfg": {"scale": "value", "ref_after": 0}},
    "dynamic_ra": {"name": "dynamic", "cfg": {"scale": "value", "ref_after": 200}},
    "dynamic_grad": {"name": "dynamic", "cfg": {"scale": "grad", "ref_after": 200}},
    "dsmd": {"name": "dsmd", "cfg": {}},
    "uncertainty": {"name": "uncertainty", "cfg": {}},
    "gradnorm": {"name": "gradnorm", "cfg": {}},
    "default": None,  # the library's default balancer
}
VIEWS: dict[str, int | None] = {"v1": 1, "v4": 4, "v6": None}
BUDGETS = ("full", "half", "eqtime")
STUDENTS = ("vit", "pruned")

#: The screening plan: half budget, seed 0, in the order they run (most informative first).
SCREEN = [
    "vit.clip_only.fixed.v6", "vit.all7.dynamic.v6", "vit.cd_cos.fixed.v6", "vit.cd_cos.dynamic_grad.v6",
    "pruned.clip_only.fixed.v6", "pruned.all7.dynamic.v6", "pruned.cd_cos.fixed.v6", "pruned.cd_cos.dynamic_grad.v6",
    "vit.default.default.v6", "pruned.default.default.v6",
    "vit.all7.dynamic_grad.v6", "pruned.all7.dynamic_grad.v6", "pruned.all7.fixed.v6", "pruned.cd.fixed.v6",
    "pruned.cd_cos_l1.fixed.v6", "pruned.cd_cos_rel.fixed.v6", "pruned.cd_cos_tok.fixed.v6",
    "pruned.cd_cos.fixed.v1", "pruned.cd_cos.fixed.v4", "pruned.cd_cos.dynamic_ra.v6", "pruned.cd_cos.dynamic.v6",
    "pruned.cd_cos.dsmd.v6", "pruned.cd_cos.uncertainty.v6", "pruned.cd_cos.gradnorm.v6",
    "vit.cd.fixed.v6", "vit.cd_cos.dynamic_ra.v6", "vit.all7.fixed.v6", "vit.cd_cos.dynamic.v6",
    "vit.cd_cos_rel.fixed.v6", "vit.cd_cos_tok.fixed.v6", "vit.cd_cos_l1.fixed.v6", "vit.cd_cos.fixed.v1",
    "vit.cd_cos.fixed.v4", "vit.cd_cos.dsmd.v6", "vit.cd_cos.uncertainty.v6", "vit.cd_cos.gradnorm.v6",
]


class StudyError(ValueError):
    """A row name or plan that does not parse."""


def parse_row(row: str) -> dict[str, Any]:
    """``{student, terms, balancer, views, budget, seed}`` of a row name (see the module doc)."""
    parts = row.split(".")
    if len(parts) != 6 or not parts[5].startswith("s") or not parts[5][1:].isdigit():
        raise StudyError(f"row {row!r}: expected <student>.<terms>.<balancer>.<views>.<budget>.s<seed>")
    spec = dict(zip(("student", "terms", "balancer", "views", "budget"), parts[:5]), seed=int(parts[5][1:]))
    for key, known in (("student", STUDENTS), ("terms", TERMS), ("balancer", BALANCERS), ("views", VIEWS),
                       ("budget", BUDGETS)):
        if spec[key] not in known:
            raise StudyError(f"row {row!r}: unknown {key} {spec[key]!r}; known: {', '.join(known)}")
    if spec["budget"] == "eqtime" and spec["terms"] != "clip_only":
        raise StudyError(f"row {row!r}: the eqtime budget is for clip_only rows (the no-teacher student)")
    return spec


def row_name(student: str, terms: str, balancer: str, views: str, budget: str, seed: int) -> str:
    return f"{student}.{terms}.{balancer}.{views}.{budget}.s{seed}"


def default_row(student: str, budget: str, seed: int) -> str:
    return row_name(student, "default", "default", "v6", budget, seed)


class Study:
    """Runs study rows on the quality benchmark's :class:`Bench` (teachers, cache, train, evaluate)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bench = Bench(quality_args(["--profile", args.profile, "--data", args.data, "--device", args.device,
                                         *(["--work", args.work] if args.work else []), *args.quality]))
        self.results: dict[str, dict[str, Any]] = {}
        if args.out.is_file():
            self.results = {r["row"]: r for r in json.loads(args.out.read_text()).get("rows", [])}

    def full_steps(self, student: str) -> tuple[int, int]:
        """(steps, batch size) of the CPU profile's full budget for ``student``."""
        a = self.bench.args
        return ((a.vit_steps or a.steps), (a.vit_batch_size or a.batch_size)) if student == "vit" else (a.steps, a.batch_size)

    def steps_of(self, spec: dict[str, Any]) -> int:
        steps, _ = self.full_steps(spec["student"])
        if spec["budget"] == "half":
            return steps // 2
        if spec["budget"] == "eqtime":  # the default row's seconds at this row's own step time
            ref = self.run(default_row(spec["student"], "full", spec["seed"]))
            alone = self.run(row_name(spec["student"], "clip_only", "fixed", spec["views"], "full", spec["seed"]))
            per_step = alone["train_seconds"] / alone["train_steps"]
            return max(1, round(ref["train_seconds"] / per_step))
        return steps

    def layers(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        """The config layers of a row over the quality benchmark's student layer."""
        teacher = spec["terms"] != "clip_only"
        b = self.bench
        student = b.vit_layer(teacher_init=teacher) if spec["student"] == "vit" else b.pruned_layer(teacher_init=teacher)
        layer: dict[str, Any] = {"train": {"steps": self.steps_of(spec), "grad_share_every": self.args.grad_share_every}}
        if TERMS[spec["terms"]] is not None:
            layer["losses"] = [{"name": n, "cfg": {}} for n in TERMS[spec["terms"]]]
        if BALANCERS[spec["balancer"]] is not None:
            layer["balancer"] = BALANCERS[spec["balancer"]]
        if VIEWS[spec["views"]] is not None:
            layer["data"] = {"max_views": VIEWS[spec["views"]]}
        return [student, layer]

    def run(self, row: str) -> dict[str, Any]:
        """Train and evaluate ``row``, or reuse its result when it was measured with the same
        training config (a ``default`` row is remeasured after the library's defaults change)."""
        spec = parse_row(row)
        b = self.bench
        name = f"study/{row}"
        preset = b.args.vit_preset if spec["student"] == "vit" else "cpu"
        layers = self.layers(spec)
        key = recipe_key(b.train_config(name, b.cache(), *layers, preset=preset, seed=spec["seed"]))
        if self.results.get(row, {}).get("config_key") == key:
            return self.results[row]
        same = next((r for r in self.results.values() if r.get("config_key") == key), None)
        if same is not None:  # another name for a config already measured (e.g. the default recipe)
            self.results[row] = {**same, "row": row, "spec": spec, "same_as": same["row"]}
            self.write()
            return self.results[row]
        start = time.perf_counter()
        result = b.student_row(name, *layers, preset=preset, seed=spec["seed"])
        result.update(row=row, spec=spec, config_key=key, **train_speed(b.work / name),
                      **log_summary(b.work / name / "train_log.jsonl"))
        result.pop("student", None)
        self.results[row] = result
        self.write()
        print(f"[{row}] rsum {result['rsum']:.2f}, {result.get('train_seconds', 0):.0f} s, "
              f"{result.get('samples_per_s', 0):.1f} samples/s ({time.perf_counter() - start:.0f} s)", flush=True)
        return result

    def write(self) -> dict[str, Any]:
        rows = sorted(self.results.values(), key=lambda r: r["row"])
        report = {"benchmark": "recipe_study", "profile": self.args.profile,
                  "environment": environment(torch.device(self.args.device)),
                  "settings": {"grad_share_every": self.args.grad_share_every, "work": str(self.bench.work),
                               "quality_settings": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(self.bench.args).items()}},
                  "rows": rows, "analysis": analyse(self.results), "targets": targets(self.results)}
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(report, indent=2, default=str))
        self.args.out.with_suffix(".md").write_text(markdown(self.results) + "\n")
        return report

    def plan(self, name: str) -> list[str]:
        if name == "screen":
            return [f"{r}.half.s0" for r in SCREEN]
        if name == "confirm":
            rows: list[str] = []
            for student in STUDENTS:
                best = best_screen(self.results, student, 3)
                for seed in (0, 1):
                    rows += [default_row(student, "full", seed), row_name(student, "clip_only", "fixed", "v6", "full", seed)]
                    rows += [f"{r}.full.s{seed}" for r in best]
                    rows.append(row_name(student, "clip_only", "fixed", "v6", "eqtime", seed))
            return list(dict.fromkeys(rows))
        return [r.strip() for r in name.split(",") if r.strip()]


def recipe_key(config: dict[str, Any]) -> str:
    """sha256 of what a row's training config decides (student architecture, budget, stages, views,
    seed), paths and devices left out."""
    config = canonical_config(config)
    keep = {k: v for k, v in config.items() if k not in ("out", "data", "device", "plugins")}
    keep["views"] = {k: config.get("data", {}).get(k) for k in ("use_views", "max_views")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_summary(log: Path) -> dict[str, Any]:
    """From a run's ``train_log.jsonl``: each term's mean gradient share and norm over the measured
    steps, its loss at the start (mean of the first 10 steps) and end (last 10), the final weights."""
    if not log.is_file():
        return {}
    recs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "train"]
    if not recs:
        return {}
    out: dict[str, Any] = {"grad_share": {}, "grad_norm": {}, "loss_start": {}, "loss_end": {}, "final_weights": {}}
    for key in sorted({k for r in recs for k in r if "/" in k}):
        kind, term = key.split("/", 1)
        vals = [r[key] for r in recs if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        if not vals:
            continue
        if kind in ("grad_share", "grad_norm"):
            out[kind][term] = statistics.fmean(vals)
        elif kind == "loss":
            out["loss_start"][term], out["loss_end"][term] = statistics.fmean(vals[:10]), statistics.fmean(vals[-10:])
        elif kind == "weight":
            out["final_weights"][term] = vals[-1]
    return out


def best_screen(results: dict[str, dict[str, Any]], student: str, k: int) -> list[str]:
    """The ``k`` best distilled screen recipes of ``student`` (row stems without budget and seed),
    the default excluded (it is always confirmed)."""
    screen = [r for r in results.values() if r["spec"]["student"] == student and r["spec"]["budget"] == "half"
              and r["spec"]["terms"] not in ("clip_only", "default")]
    screen.sort(key=lambda r: -r["rsum"])
    return [r["row"].rsplit(".", 2)[0] for r in screen[:k]]


def _groups(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by stem (the name without the seed)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        out.setdefault(r["row"].rsplit(".", 1)[0], []).append(r)
    return out


def _stat(rows: list[dict[str, Any]]) -> dict[str, Any]:
    vals = [r["rsum"] for r in rows]
    return {"seeds": len(vals), "mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "rsum": vals}


def analyse(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per stem: RSUM mean / spread over seeds, and the change against the same student's default
    and no-teacher rows of the same budget."""
    groups = {stem: _stat(rows) for stem, rows in _groups(results).items()}
    for stem, g in groups.items():
        student, _, _, _, budget = stem.split(".")
        for ref_name, ref in (("vs_default", f"{student}.default.default.v6.{budget}"),
                              ("vs_clip_only", f"{student}.clip_only.fixed.v6.{budget}")):
            if ref in groups and ref != stem:
                g[ref_name] = {"delta": g["mean"] - groups[ref]["mean"], "ratio": g["mean"] / max(groups[ref]["mean"], 1e-9)}
    return groups


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at the full budget (means over seeds; judged only with 2 seeds)."""
    groups = {stem: _stat(rows) for stem, rows in _groups(results).items()}
    out: dict[str, Any] = {}

    def judge(key: str, num: str, den: str, target: float) -> None:
        if num in groups and den in groups:
            value = groups[num]["mean"] / max(groups[den]["mean"], 1e-9)
            seeds = min(groups[num]["seeds"], groups[den]["seeds"])
            out[key] = {"value": value, "target": target, "met": value >= target if seeds >= 2 else None}

    judge("vit_default_vs_clip_only_equal_steps", "vit.default.default.v6.full", "vit.clip_only.fixed.v6.full", 3.0)
    judge("vit_default_vs_clip_only_equal_time", "vit.default.default.v6.full", "vit.clip_only.fixed.v6.eqtime", 2.0)
    judge("pruned_default_vs_clip_only", "pruned.default.default.v6.full", "pruned.clip_only.fixed.v6.full", 1.5)
    for student in STUDENTS:
        default = groups.get(f"{student}.default.default.v6.full")
        if not default:
            continue
        for stem, g in groups.items():
            if not stem.startswith(student + ".") or not stem.endswith(".full") or stem == f"{student}.default.default.v6.full" \
                    or ".clip_only." in stem:
                continue
            margin = default["mean"] - g["mean"]
            spread = max(default["spread"], g["spread"])
            judged = default["seeds"] >= 2 and g["seeds"] >= 2
            out[f"default_vs_{stem}"] = {"value": margin, "target": f">= -spread ({spread:.2f})",
                                         "met": margin >= -spread if judged else None}
    return out


def markdown(results: dict[str, dict[str, Any]]) -> str:
    groups = analyse(results)
    lines = ["| row (without seed) | seeds | RSUM mean | spread | vs default | vs clip_only | steps | train s | "
             "samples/s | gradient share per term |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stem in sorted(groups, key=lambda s: (s.split(".")[0], s.split(".")[4], -groups[s]["mean"])):
        g, rows = groups[stem], [r for r in results.values() if r["row"].rsplit(".", 1)[0] == stem]
        share = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rows[0].get("grad_share", {}).items(), key=lambda kv: -kv[1]))
        speed = " | ".join(f"{statistics.fmean(r[k] for r in rows):.0f}" if all(isinstance(r.get(k), (int, float)) for r in rows)
                           else "-" for k in ("train_steps", "train_seconds", "samples_per_s"))
        vs = " | ".join(f"{g[k]['delta']:+.2f}" if k in g else "-" for k in ("vs_default", "vs_clip_only"))
        lines.append(f"| {stem} | {g['seeds']} | {g['mean']:.2f} | {g['spread']:.2f} | {vs} | {speed} | {share or '-'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.common import FLICKR8K

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="screen", help="screen | confirm | a comma list of row names")
    p.add_argument("--profile", default="cpu", help="the quality benchmark profile whose budget, teachers and cache it uses")
    p.add_argument("--data", default=str(FLICKR8K))
    p.add_argument("--work", default=None, help="the quality benchmark's work folder (default: its profile's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-share-every", type=int, default=50, help="measure gradient shares every N steps (0: off)")
    p.add_argument("--stop-after", type=float, default=None, help="start no new row after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/recipe_study_<profile>.json)")
    args, args.quality = p.parse_known_args(argv)  # other flags: the quality benchmark's (budget, teacher, cache)
    args.out = args.out or RESULTS_DIR / f"recipe_study_{args.profile}.json"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    study = Study(args)
    try:
        rows = study.plan(args.plan)
        for r in rows:
            parse_row(r)
    except StudyError as e:
        raise SystemExit(f"error: {e}")
    started = time.perf_counter()
    for row in rows:
        if args.stop_after is not None and time.perf_counter() - started > args.stop_after and row not in study.results:
            print(f"recipe_study: --stop-after {args.stop_after:.0f} s reached; {row} and later rows not started", flush=True)
            break
        study.run(row)
    report = study.write()
    print(markdown(study.results))
    verdict = {True: "met", False: "missed", None: "not judged"}
    met = ", ".join(f"{k}={v['value']:.2f} ({verdict[v['met']]})" for k, v in report["targets"].items()) or "no full-budget pairs yet"
    print(f"recipe_study[{args.profile}]: {len(study.results)} rows | {met}")
    return report


if __name__ == "__main__":
    script_main(main)
