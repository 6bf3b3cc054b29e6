"""Train a student from a teacher cache: ``python -m distill.train_student --cache DIR --data X.tsv``.

Student forward -> :class:`DistillBatch` -> every configured loss term -> balancer -> backward, with
AdamW + warmup/cosine schedule, AMP, gradient accumulation, clipping, a non-finite guard, DDP under
``torchrun`` (the global batch is split over ranks; results match a single process), exact resume
from checkpoints, JSONL/TensorBoard logs, periodic retrieval evaluation and a loss plot.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from distill.core import dist as D
from distill.core.cache.reader import VERIFY_MODES, TeacherCache
from distill.core.checkpoint import check_run_dir, load_resume, prepare_run_dir, save_checkpoint, set_rng_state
from distill.core.errors import CheckpointError, ConfigError, NonFiniteTargetError, ResumeMismatchError
from distill.pipeline.cli import ArgumentParser, check_device, cli_main
from distill.core.registry import load_plugins
from distill.pipeline.train.config import presets, resolve_config, save_config, warmup_steps
from distill.core.data.factory import load_dataset
from distill.core.determinism import enable_determinism
from distill.distiller import Distiller, build_distiller, loss_dims
from distill.core.data.pixels import student_pixels
from distill.pipeline.train.target_check import screen_batch
from distill.pipeline.train.data import DistillTrainSet, GlobalBatchSampler, TeacherCollate, TrainBatch, check_alignment
from distill.pipeline.train.log import TrainLogger, plot_losses, read_log


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m distill.train_student", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], help="YAML/JSON config file (repeatable, later wins)")
    p.add_argument("--preset", choices=presets(), help="built-in preset applied before --config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 --set student.vision_layers=4 (repeatable)")
    p.add_argument("--cache", help="teacher cache directory (data.cache)")
    p.add_argument("--data", help="dataset the cache was built from (data.path)")
    p.add_argument("--split", help="dataset split (data.split; default: the cache's split)")
    p.add_argument("--images-root", help="image root for CSV/JSON datasets (data.images_root)")
    p.add_argument("--student", help="student registry name (student.name), e.g. vit or pruned")
    p.add_argument("--out", help="output directory (out)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--epochs", type=float, help="epochs, used when --steps is not given (train.epochs)")
    p.add_argument("--batch-size", type=int, help="global batch size per micro-step (train.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    p.add_argument("--device", help="cpu | cuda (device; default: cuda when available)")
    p.add_argument("--seed", type=int, help="seed for init, shuffling and caption/view choice (seed)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per rank (data.num_workers)")
    p.add_argument("--verify-cache", choices=VERIFY_MODES,
                   help="teacher cache integrity check (data.verify_cache; lazy: sha256 of each array file on first read; "
                        "full: everything at start; size: sizes only; auto (default): lazy for caches of <= 64 kB "
                        "per image, else size; none: also skips the changed-image check)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (train.precision)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="resume from the newest intact checkpoint of OUT/checkpoints (auto) or a checkpoint file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (without --resume or --overwrite such a folder is refused)")
    p.add_argument("--plugin", action="append", default=[], help="module to import first (registers teachers/students/losses)")
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve the full config: defaults <- preset <- files <- flags <- --set."""
    flags = {"data.cache": args.cache, "data.path": args.data, "data.split": args.split,
             "data.images_root": args.images_root, "data.num_workers": args.num_workers, "student.name": args.student,
             "data.verify_cache": args.verify_cache,
             "out": args.out, "train.steps": args.steps, "train.epochs": args.epochs, "train.batch_size": args.batch_size,
             "train.lr": args.lr, "device": args.device, "seed": args.seed, "train.precision": args.precision}
    overrides = list(args.overrides)
    if args.epochs is not None and args.steps is None:
        overrides.insert(0, "train.steps=null")  # --epochs replaces a configured step count (--set still wins)
    cfg = resolve_config(args.preset, args.config, flags, overrides)
    cfg["plugins"] = list(dict.fromkeys([*cfg["plugins"], *args.plugin]))
    return cfg


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, train: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW (fused kernel: one pass over all tensors instead of a Python loop per tensor); norms,
    biases, the logit scale and balancer parameters get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or name.startswith("balancer.")
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(train["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(train["lr"]),
                             betas=tuple(float(b) for b in train["betas"]), eps=float(train["eps"]), fused=True)


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: dict[str, Any]
    info: D.DistInfo
    student: nn.Module
    distiller: Distiller
    model: nn.Module  # the distiller, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: GlobalBatchSampler
    loader: DataLoader
    total_steps: int
    cache: TeacherCache | None = None
    skipped_samples: int = 0  # samples dropped for non-finite teacher targets (data.on_nonfinite=skip)


def setup(cfg: dict[str, Any], info: D.DistInfo) -> Run:
    """Load data + cache (checking they match), build student/losses/balancer/optimizer/loader."""
    data, train = cfg["data"], cfg["train"]
    if not data["cache"] or not data["path"]:
        raise SystemExit("error: --cache and --data are required (or data.cache / data.path in the config)")
    cache = TeacherCache(data["cache"], verify=data["verify_cache"])
    manifest_ds = cache.manifest.get("dataset", {})
    split = data["split"] if data["split"] is not None else manifest_ds.get("split")
    on_bad = "skip" if manifest_ds.get("skipped") else "error"
    dataset = load_dataset(data["path"], split, data["images_root"], on_bad_sample=on_bad)
    check_alignment(dataset, cache)
    if data["verify_cache"] != "none":
        cache.check_images(dataset.stats_digest)  # images replaced after caching -> StaleCacheError

    torch.manual_seed(cfg["seed"])
    from students import create_student

    student_kw = {k: v for k, v in cfg["student"].items() if k != "name"}
    student = create_student(cfg["student"]["name"], **student_kw)
    distiller = build_distiller(student, loss_dims(student, cache), cfg["losses"], cfg["balancer"],
                                train["warmup_stage"], train["embed_projection"]).to(info.device)
    _student_runtime(student, train, info)
    model: nn.Module = distiller
    if info.enabled:
        model = DistributedDataParallel(distiller, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                        find_unused_parameters=bool(train["find_unused_parameters"]),
                                        forward_sync_buffers=False)

    trainset = DistillTrainSet(dataset, cache, student.image_transform(), cfg["seed"], bool(data["use_views"]),
                               data["pixels"])
    if info.is_main and trainset.pixel_source != "decode":
        print(f"distill: student pixels read from the cache ({trainset.pixel_source}, {cache.pixel_size} px)", flush=True)
    if len(trainset) < train["batch_size"]:
        raise ConfigError(f"train.batch_size {train['batch_size']} is larger than the {len(trainset)} training images; "
                          f"pass --batch-size {len(trainset)} or less (--preset gpu's batch of 256 is meant for GPUs "
                          "and large datasets; use --preset cpu on small data)")
    sampler = GlobalBatchSampler(len(trainset), train["batch_size"], cfg["seed"], info.rank, info.world_size)
    workers = int(data["num_workers"])
    loader = DataLoader(trainset, batch_sampler=sampler, num_workers=workers,
                        collate_fn=TeacherCollate(cache, "auto" if trainset.num_views > 1 else "full"),
                        pin_memory=info.device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    total = train["steps"]
    if total is None:
        total = max(1, int(float(train["epochs"]) * sampler.batches_per_epoch()) // train["accum_steps"])
        train["steps"] = total
    if distiller.warmup_steps >= total:
        raise SystemExit(f"error: train.warmup_stage.steps ({distiller.warmup_steps}) must be smaller than the "
                         f"number of optimizer steps ({total})")

    optimizer = make_optimizer(distiller, train)
    warmup, min_ratio = warmup_steps(train["warmup_steps"], total), float(train["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
    if train["precision"] == "fp16" and info.device.type != "cuda":
        raise SystemExit("error: train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    scaler = torch.amp.GradScaler(info.device.type, enabled=train["precision"] == "fp16")
    return Run(cfg, info, student, distiller, model, optimizer, scheduler, scaler, sampler, loader, total, cache)


def _student_runtime(student: nn.Module, train: dict[str, Any], info: D.DistInfo) -> None:
    """``train.sync_bn``, ``train.channels_last`` and ``train.compile`` (distill/student_runtime.py)."""
    from distill.pipeline.train import student_runtime as SR

    if SR.wants_sync_bn(train["sync_bn"], info.world_size, info.device, student):
        n = SR.convert_sync_bn(student)
        if info.is_main:
            print(f"distill: {n} BatchNorm layers synchronised across {info.world_size} ranks (SyncBatchNorm)", flush=True)
    if train["channels_last"]:
        SR.to_channels_last(student)
    if train["compile"]:
        SR.compile_student(student)


def epoch_batches(run: Run, epoch: int, position: int) -> Iterator[tuple[int, int, TrainBatch]]:
    """Endless (epoch, position after this batch, batch), starting ``position`` batches into ``epoch``."""
    while True:
        run.sampler.set_epoch(epoch, position)
        for batch in run.loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


def _rollback_buffers(distiller: Distiller) -> dict[str, Tensor]:
    """The part of :meth:`Distiller.rollback_buffers` a skipped step can have changed: of the
    student's buffers only the running statistics of BatchNorm layers in training mode (the others
    are constants, frozen eval-mode statistics included), and none that its module lists in
    ``rollback_exempt`` (buffer names it only changes once the step is applied, e.g. GradNorm's
    weights in ``end_step``)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    modules = dict(distiller.named_modules())
    out: dict[str, Tensor] = {}
    for name, b in distiller.rollback_buffers().items():
        owner, _, leaf = name.rpartition(".")
        m = modules[owner]
        if (owner == "student" or owner.startswith("student.")) and not (isinstance(m, _BatchNorm) and m.training):
            continue
        if leaf not in getattr(m, "rollback_exempt", ()):
            out[name] = b
    return out


def _state_snapshot(distiller: Distiller) -> dict[str, Tensor]:
    """Copy of :func:`_rollback_buffers` to undo a skipped step; parameters need no copy, since a
    skipped step never reaches the optimizer, nor the teacher queue, which only changes at
    ``commit_queues`` after the step."""
    return {name: b.clone() for name, b in _rollback_buffers(distiller).items()}


def _restore_snapshot(distiller: Distiller, snap: dict[str, Tensor]) -> None:
    buffers = distiller.rollback_buffers()
    with torch.no_grad():
        for name, value in snap.items():
            buffers[name].copy_(value)


def _all_finite(ok: Tensor) -> bool:
    """True only if the bool tensor ``ok`` holds on every rank: the step's one host sync."""
    bad = (~ok).to(torch.float32).reshape(1)
    D.all_reduce(bad)  # sum over ranks (a no-op in a single process)
    return bad.item() == 0.0


def host_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with its tensor values as Python floats, converted in one device-to-host copy
    (``train_step`` leaves losses and the gradient norm on the device until a log step needs them)."""
    keys = [k for k, v in fields.items() if isinstance(v, Tensor)]
    if not keys:
        return dict(fields)
    values = torch.stack([fields[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**fields, **dict(zip(keys, values))}


def train_step(run: Run, batches: Iterator[tuple[int, int, TrainBatch]], step: int) -> tuple[dict[str, Any], int, int, bool]:
    """One optimizer step over ``accum_steps`` micro-batches.

    Returns (log fields, epoch, position, applied); ``applied`` is False when the loss or the
    gradients were non-finite and the update was skipped."""
    train = run.cfg["train"]
    accum, device = train["accum_steps"], run.info.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train["precision"])
    snap = _state_snapshot(run.distiller)
    balancer = run.distiller.warmup_balancer if run.distiller.stage(step) == 1 else run.distiller.balancer
    balancer.begin_step(run.scaler.get_scale() if balancer.uses_loss_scale and run.scaler.is_enabled() else 1.0)
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    total_sum = torch.zeros((), device=device)
    epoch = position = 0
    for micro in range(accum):
        epoch, position, batch = _next_finite_batch(run, batches)
        text = {k: v.to(device) for k, v in run.student.tokenize(batch.texts).items()}
        pixels = student_pixels(batch, run.student, device)
        if train["channels_last"]:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        sync = run.model.no_sync() if isinstance(run.model, DistributedDataParallel) and micro < accum - 1 \
            else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = run.model(pixels, text, batch.teacher, batch.image_index, step, run.total_steps)
            run.scaler.scale(out.total / accum).backward()
        total_sum = total_sum + out.total.detach().float()
        for name, value in out.losses.items():
            sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float()
        weights = dict(out.weights)
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    params = [p for p in run.distiller.parameters() if p.grad is not None]
    clip = float(train["grad_clip"]) or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).float() if params else torch.zeros((), device=device)
    finite = torch.isfinite(total_sum) & torch.isfinite(grad_norm)
    for value in sums.values():  # a non-finite term counts even when the balancer gave it weight 0
        finite = finite & torch.isfinite(value)
    applied = _all_finite(finite)
    if applied:
        run.scaler.step(run.optimizer)
        run.distiller.commit_queues()
    else:
        run.optimizer.zero_grad(set_to_none=True)
        run.distiller.discard_pending()
        _restore_snapshot(run.distiller, snap)
    balancer.end_step(applied)
    if run.scaler.is_enabled():
        run.scaler.update()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    fields = {"lr": lr, "stage": run.distiller.stage(step), **{f"loss/{k}": v / accum for k, v in sums.items()},
              **{f"weight/{k}": float(v) for k, v in weights.items()}, "total": total_sum / accum, "grad_norm": grad_norm,
              "skipped_samples": run.skipped_samples}
    return fields, epoch, position, applied


def _next_finite_batch(run: Run, batches: Iterator[tuple[int, int, TrainBatch]]) -> tuple[int, int, TrainBatch]:
    """The next batch on the device with its non-finite teacher targets handled per
    ``data.on_nonfinite`` (error: raise; skip: drop those rows, counted in ``run.skipped_samples``)."""
    for _ in range(max(1, run.sampler.batches_per_epoch()) + 1):
        epoch, position, batch = next(batches)
        batch, dropped = screen_batch(batch.to(run.info.device), run.cache, run.cfg["data"]["on_nonfinite"])
        run.skipped_samples += dropped
        if len(batch.texts):
            return epoch, position, batch
    raise NonFiniteTargetError(f"teacher cache {run.cache.path}: a whole epoch of batches had only non-finite "
                               "teacher targets; rebuild the cache")


def evaluate(run: Run, eval_ds: Any) -> dict[str, float]:
    """Retrieval metrics of the student on the validation split (rank 0; the others wait)."""
    metrics: dict[str, float] = {}
    if run.info.is_main:
        from distill.pipeline.evaluate import evaluate_model

        was_training = run.student.training
        run.student.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate_model(run.student, eval_ds, run.cfg["eval"]["batch_size"],
                                                               run.info.device).items()
                       if isinstance(v, (int, float))}
        run.student.train(was_training)
    D.wait_for_main()
    return metrics


def format_eval(step: int, metrics: dict[str, float], total: float | None) -> str:
    """The console line of one validation: step, RSUM, R@1 both ways and the step's total loss."""
    loss = f", total loss {total:.4f}" if total is not None else ""
    return (f"eval step {step}: rsum {metrics['rsum']:.2f} (i2t R@1 {metrics['i2t_R@1']:.2f}, "
            f"t2i R@1 {metrics['t2i_R@1']:.2f}){loss}")


def _checkpoint_state(run: Run, epoch: int, position: int, skipped: int) -> dict[str, Any]:
    return {"student": run.student.state_dict(), "student_config": run.student.config(),
            "losses": run.distiller.losses.state_dict(), "balancer": run.distiller.balancer.state_dict(),
            "warmup_losses": run.distiller.warmup_losses.state_dict(), "shared": run.distiller.shared_state_dict(),
            "config": run.cfg,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "sampler": {"epoch": epoch, "position": position},
            "skipped_nonfinite": skipped, "skipped_samples": run.skipped_samples, "source": _source(run)}


def _source(run: Run) -> dict[str, str]:
    """The teacher and dataset the run's cache was built from (a resume must use the same)."""
    return {"teacher_hash": run.cache.teacher_hash, "dataset_fingerprint": run.cache.dataset_fingerprint}


def _restore(run: Run, ckpt: dict[str, Any]) -> tuple[int, int, int, int]:
    """Load a checkpoint into the run; returns (step, epoch, position, skipped)."""
    if ckpt["student_config"] != run.student.config():
        raise ResumeMismatchError(f"the checkpoint's student {ckpt['student_config']} differs from the configured "
                                  f"student {run.student.config()}")
    for key, now in _source(run).items():
        then = ckpt.get("source", {}).get(key, now)
        if then != now:
            raise ResumeMismatchError(f"the checkpoint was trained on a cache with {key} {then[:12]}, but "
                                      f"{run.cache.path} has {now[:12]} (rebuilt with another teacher or dataset); "
                                      "resume with the original cache or start over with --overwrite")
    run.skipped_samples = int(ckpt.get("skipped_samples", 0))
    run.student.load_state_dict(ckpt["student"])
    if "shared" not in ckpt:
        raise CheckpointError("the checkpoint predates the distiller's shared embedding projections and teacher "
                              "queue (loss-owned projections/queues); it cannot be resumed by this version: start "
                              "a new run (the saved student/ weights remain usable)")
    try:
        run.distiller.losses.load_state_dict(ckpt["losses"])
        run.distiller.warmup_losses.load_state_dict(ckpt.get("warmup_losses", {}))
        run.distiller.load_shared_state_dict(ckpt["shared"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's loss state does not match the configured losses: {e}") from e
    run.distiller.balancer.load_state_dict(ckpt["balancer"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"]), int(ckpt["sampler"]["epoch"]), int(ckpt["sampler"]["position"]), int(ckpt["skipped_nonfinite"])


def _init_projections(run: Run, samples: int) -> None:
    """Least-squares start of the student's projection heads on the first training batches."""
    from distill.pipeline.train.projection_init import init_projections

    run.sampler.set_epoch(0, 0)
    report = init_projections(run.student, run.loader, samples, run.info.device, projections=run.distiller.projections)
    if run.info.is_main:
        fits = ", ".join(f"{m} cos {r['cos_before']:.3f} -> {r['cos_after']:.3f}"
                         for m, r in report.items() if isinstance(r, dict))
        short = (f"; asked for {samples}, but one pass over the training batches holds only {report['samples']}"
                 if report["samples"] < samples else "")
        print(f"distill: projection heads fitted to the teacher on {report['samples']} samples ({fits}){short}",
              flush=True)


def train(cfg: dict[str, Any], resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run training as configured, optionally resuming (``"auto"`` or a checkpoint path) or replacing
    an earlier run in ``out`` (``overwrite``); returns a summary dict (also printed as one line by rank 0)."""
    if cfg["train"]["deterministic"]:
        enable_determinism()  # before anything touches CUDA (cuBLAS reads its workspace setting once)
    load_plugins(cfg["plugins"])
    check_device(cfg["device"], "device")
    info = D.init_distributed(cfg["device"])
    out = Path(cfg["out"])
    check_run_dir(out, resume, overwrite)  # refuse early; delete an overwritten run only once the inputs load
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    run = setup(cfg, info)
    if info.is_main:
        prepare_run_dir(out, resume, overwrite)
    D.barrier()
    found = load_resume(out, resume)
    resume_path = found[0] if found else None
    step = epoch = position = skipped = 0
    ckpt = found[1] if found else None
    if ckpt is not None:
        step, epoch, position, skipped = _restore(run, ckpt)
    elif cfg["train"]["init_projections"]:
        _init_projections(run, int(cfg["train"]["init_projections"]))
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    logger = TrainLogger(out, resume_step=step) if info.is_main else None
    eval_cfg = cfg["eval"]
    eval_ds = load_dataset(eval_cfg["data"], eval_cfg["split"], eval_cfg["images_root"]) if eval_cfg["data"] else None
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    del ckpt

    train_cfg = cfg["train"]
    global_batch = train_cfg["batch_size"] * train_cfg["accum_steps"]
    batches = epoch_batches(run, epoch, position)
    run.distiller.train()
    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=step, disable=not info.is_main, desc="distill", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    started, last, metrics = time.time(), {}, {}
    interval_steps, interval_s = 0, 0.0  # training steps and their seconds since the last log step
    while step < run.total_steps:
        t0 = time.time()
        fields, epoch, position, applied = train_step(run, batches, step)
        skipped += not applied
        step += 1
        interval_steps, interval_s = interval_steps + 1, interval_s + time.time() - t0
        bar.update(1)
        if step % train_cfg["log_every"] == 0 or step == run.total_steps:  # the only host copy of the log values
            rate = global_batch * interval_steps / max(interval_s, 1e-9)
            interval_steps, interval_s = 0, 0.0
            last = host_fields({"kind": "train", "step": step, "epoch": epoch, **fields, "samples_per_s": rate,
                                "skipped_nonfinite": skipped})
            if logger:
                logger.log(last)
            bar.set_postfix(loss=f"{last['total']:.4f}", samples_s=f"{rate:.0f}", skipped=skipped)
        if step == run.distiller.warmup_steps and info.is_main:
            bar.write(f"distill: warm-up stage done after {step} steps ({', '.join(run.distiller.warmup_losses)}); "
                      f"now training with {', '.join(run.distiller.losses)}")
        if eval_ds is not None and eval_cfg["every"] and (step % eval_cfg["every"] == 0 or step == run.total_steps):
            metrics = evaluate(run, eval_ds)
            if logger:
                logger.log({"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                bar.write(format_eval(step, metrics, float(fields["total"])))
        if step % train_cfg["checkpoint_every"] == 0 or step == run.total_steps:
            if info.is_main:
                save_checkpoint(out, step, _checkpoint_state(run, epoch, position, skipped), train_cfg["keep_checkpoints"])
            D.wait_for_main()
    bar.close()
    if eval_ds is not None and not eval_cfg["every"]:
        metrics = evaluate(run, eval_ds)
        if logger:
            logger.log({"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
            print(format_eval(step, metrics, last.get("total")), flush=True)
    reused = not last and step >= run.total_steps
    if reused:  # resumed a finished run: nothing trained now; report the run's logged final loss
        last = (read_log(out) or [{}])[-1]
    summary = {"steps": step, "final_total": last.get("total"), "skipped_nonfinite": skipped,
               "skipped_samples": run.skipped_samples,
               "seconds": time.time() - started, "student": str(out / "student"), "eval": metrics}
    if info.is_main:
        logger.close()
        plot_losses(out)
        from students import save_student

        save_student(run.student, out / "student")
        rsum = f", eval rsum {metrics['rsum']:.2f}" if "rsum" in metrics else ""
        final = f"{summary['final_total']:.4f}" if summary["final_total"] is not None else "n/a"
        dropped = f", {run.skipped_samples} samples with non-finite teacher targets dropped" if run.skipped_samples else ""
        if reused:
            print(f"distill: {out} already holds a finished run of {step} steps (checkpoint {resume_path}); reused it "
                  "without training (pass another --out, or a larger --steps, to train more)", flush=True)
        print(f"distill: {step} steps, final total loss {final}, {skipped} skipped non-finite{dropped}{rsum}; "
              f"student saved to {out / 'student'}", flush=True)
    D.wait_for_main()
    D.cleanup()
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and train; returns the summary dict and raises typed errors (the command line
    goes through :func:`distill.pipeline.cli.run_cli`, which turns them into one line and exit status 2)."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cuda = torch.cuda.is_available() if cfg["device"] is None else str(cfg["device"]).startswith("cuda")
    if args.preset == "gpu" and not cuda:
        print("warning: --preset gpu is meant for a CUDA GPU (ViT-S/16 at 224 px, batch 256, bf16); on CPU use "
              "--preset cpu (or lower --batch-size and the student size)", file=sys.stderr)
    return train(cfg, args.resume, args.overwrite)


if __name__ == "__main__":
    cli_main(main)
