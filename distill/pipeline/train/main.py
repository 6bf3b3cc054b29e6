"""Train a student from a teacher cache: ``python -m distill.train_student --cache DIR --data X.tsv``.

From Python: ``train(config) -> TrainResult`` (``config`` a :class:`TrainRunConfig` or a config dict).

Student forward -> :class:`DistillBatch` -> the loss terms of the active stage -> its balancer ->
backward, with AdamW + warmup/cosine schedule, AMP, gradient accumulation, clipping, a non-finite
guard, DDP under ``torchrun`` (the global batch is split over ranks; results match a single
process), exact resume from checkpoints, JSONL/TensorBoard logs, periodic retrieval evaluation and a
loss plot. This module holds the command line, :func:`setup` (data, cache, student, distiller,
optimizer, loader) and :func:`train`; the step and the loop are :mod:`distill.pipeline.train.loop`,
the optimizer side :mod:`distill.pipeline.train.optim`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from distill.core import dist as D
from distill.core.cache import VERIFY_MODES, TeacherCache
from distill.core.checkpoint import set_rng_state
from distill.core.data.factory import load_dataset
from distill.core.determinism import enable_determinism
from distill.core.errors import CheckpointError, ConfigError, ResumeMismatchError
from distill.core.lock import output_lock
from distill.core.registry import load_plugins
from distill.distiller import build_distiller, loss_dims
from distill.pipeline.cli import ArgumentParser, check_device, cli_main, flag_value
from distill.pipeline.train.config import TrainRunConfig, presets, resolve_config, save_config
from distill.pipeline.train.data import DistillTrainSet, GlobalBatchSampler, TeacherCollate, check_alignment
from distill.pipeline.train.log import TrainLogger, plot_losses, read_log
from distill.pipeline.train.loop import LoopState, Run, run_loop, source
from distill.pipeline.train.optim import make_optimizer, make_scaler, make_scheduler
from distill.pipeline.train.run_dir import (check_resume_source, check_run_dir, has_checkpoint, load_resume,
                                           prepare_run_dir)


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
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve the full config dict: defaults <- preset <- files <- flags <- --set."""
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


def as_config(config: TrainRunConfig | Mapping[str, Any]) -> TrainRunConfig:
    """A typed config of its own: a copy of ``config``, or a config dict (a partial one is a layer
    over the defaults) validated into one."""
    return copy.deepcopy(config) if isinstance(config, TrainRunConfig) else TrainRunConfig.from_dict(config)


# -- setup ----------------------------------------------------------------------------------------
def setup(config: TrainRunConfig | Mapping[str, Any], info: D.DistInfo) -> Run:
    """Load data + cache (checking they match), build student/stages/optimizer/loader. With
    ``train.steps`` unset the step count derived from ``train.epochs`` is written into the config."""
    config = as_config(config)
    data, train = config.data, config.train
    if not data.cache or not data.path:
        raise ConfigError("--cache and --data are required (or data.cache / data.path in the config)")
    cache = TeacherCache(data.cache, verify=data.verify_cache)
    manifest_ds = cache.manifest.get("dataset", {})
    split = data.split if data.split is not None else manifest_ds.get("split")
    on_bad = "skip" if manifest_ds.get("skipped") else "error"
    dataset = load_dataset(data.path, split, data.images_root, on_bad_sample=on_bad)
    check_alignment(dataset, cache)
    if data.verify_cache != "none":
        cache.check_images(dataset.stats_digest)  # images replaced after caching -> StaleCacheError

    torch.manual_seed(config.seed)
    from students import create_student

    student = create_student(config.student.name, **config.student.options)
    stages = [s.to_dict() for s in config.effective_stages()]
    distiller = build_distiller(student, loss_dims(student, cache), stages, train.embed_projection).to(info.device)
    _student_runtime(student, config, info)
    model: nn.Module = distiller
    if info.enabled:
        model = DistributedDataParallel(distiller, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                        find_unused_parameters=bool(train.find_unused_parameters),
                                        forward_sync_buffers=False)

    trainset = DistillTrainSet(dataset, cache, student.image_transform(), config.seed, bool(data.use_views), data.pixels,
                               data.max_views)
    if info.is_main and trainset.pixel_source != "decode":
        print(f"distill: student pixels read from the cache ({trainset.pixel_source}, {cache.pixel_size} px)", flush=True)
    if len(trainset) < train.batch_size:
        raise ConfigError(f"train.batch_size {train.batch_size} is larger than the {len(trainset)} training images; "
                          f"pass --batch-size {len(trainset)} or less (--preset gpu's batch of 256 is meant for GPUs "
                          "and large datasets; use --preset cpu on small data)")
    sampler = GlobalBatchSampler(len(trainset), train.batch_size, config.seed, info.rank, info.world_size)
    workers = int(data.num_workers)
    collate = TeacherCollate(cache, "auto" if trainset.num_views > 1 else "full", tokenize=student.tokenize)
    loader = DataLoader(trainset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    total = train.steps
    if total is None:
        total = max(1, int(float(train.epochs) * sampler.batches_per_epoch()) // train.accum_steps)
        train.steps = total
    config.check_stage_steps(total)

    optimizer = make_optimizer(distiller, train)
    scheduler = make_scheduler(optimizer, train, total)
    scaler = make_scaler(train.precision, info.device)
    return Run(config, info, student, distiller, model, optimizer, scheduler, scaler, sampler, loader, total, cache)


def _student_runtime(student: nn.Module, config: TrainRunConfig, info: D.DistInfo) -> None:
    """``train.sync_bn``, ``train.channels_last`` and ``train.compile`` (student_runtime.py)."""
    from distill.pipeline.train import student_runtime as SR

    train = config.train
    if SR.wants_sync_bn(train.sync_bn, info.world_size, info.device, student):
        n = SR.convert_sync_bn(student)
        if info.is_main:
            print(f"distill: {n} BatchNorm layers synchronised across {info.world_size} ranks (SyncBatchNorm)", flush=True)
    if train.channels_last:
        SR.to_channels_last(student)
    if train.compile:
        SR.compile_student(student)


def restore(run: Run, ckpt: dict[str, Any]) -> LoopState:
    """Load a checkpoint into the run; returns where the loop resumes."""
    if ckpt["student_config"] != run.student.config():
        raise ResumeMismatchError(f"the checkpoint's student {ckpt['student_config']} differs from the configured "
                                  f"student {run.student.config()}")
    check_resume_source(ckpt.get("source", {}), source(run), run.cache.path)
    run.skipped_samples = int(ckpt.get("skipped_samples", 0))
    run.student.load_state_dict(ckpt["student"])
    if "shared" not in ckpt:
        raise CheckpointError("the checkpoint predates the distiller's shared embedding projections and teacher "
                              "queue (loss-owned projections/queues); it cannot be resumed by this version: start "
                              "a new run (the saved student/ weights remain usable)")
    stages = run.distiller.stages
    if ckpt.get("previous_layout") and len(ckpt["stages"]) > 1:
        raise CheckpointError("the checkpoint was written before training stages with a train.warmup_stage; its "
                              "optimizer state does not map onto this version's parameters: start a new run "
                              "(the saved student/ weights remain usable)")
    if len(ckpt["stages"]) != len(stages):
        raise CheckpointError(f"the checkpoint holds {len(ckpt['stages'])} training stage(s) but the config has "
                              f"{len(stages)}: resume with the config it was trained with")
    try:
        for stage, state in zip(stages, ckpt["stages"]):
            stage.losses.load_state_dict(state["losses"])
        run.distiller.load_shared_state_dict(ckpt["shared"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's loss state does not match the configured losses: {e}") from e
    for stage, state in zip(stages, ckpt["stages"]):
        stage.balancer.load_state_dict(state["balancer"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    return LoopState(step=int(ckpt["step"]), epoch=int(ckpt["sampler"]["epoch"]),
                     position=int(ckpt["sampler"]["position"]), skipped=int(ckpt["skipped_nonfinite"]))


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


# -- training -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 also prints it as one line)."""

    steps: int  # optimizer steps the run has trained in all
    final_total: float | None  # total loss of the last logged step
    skipped_nonfinite: int  # optimizer steps skipped for non-finite losses/gradients
    skipped_samples: int  # samples dropped for non-finite teacher targets (data.on_nonfinite=skip)
    seconds: float
    student: Path  # the saved student folder
    eval: dict[str, float] = field(default_factory=dict)  # the last evaluation (eval.data)
    reused: bool = False  # the run folder already held a finished run: nothing was trained

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        return {**asdict(self), "student": str(self.student)}


def train(config: TrainRunConfig | Mapping[str, Any], resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run training as configured (a :class:`TrainRunConfig` or a config dict), optionally resuming
    (``"auto"`` or a checkpoint path) or replacing an earlier run in ``out`` (``overwrite``).
    Raises the typed errors of :mod:`distill.core.errors`."""
    config = as_config(config)
    if config.train.deterministic:
        enable_determinism()  # before anything touches CUDA (cuBLAS reads its workspace setting once)
    load_plugins(config.plugins)
    check_device(config.device, "device")
    info = D.init_distributed(config.device)
    out = Path(config.out)
    check_run_dir(out, resume, overwrite)  # refuse early; delete an overwritten run only once the inputs load
    with output_lock(out) if info.is_main else contextlib.nullcontext():  # one writer per run folder
        return _train_locked(config, info, out, resume, overwrite)


def _train_locked(config: TrainRunConfig, info: D.DistInfo, out: Path, resume: str | None,
                  overwrite: bool) -> TrainResult:
    """:func:`train` once the run folder is checked and (on the main rank) locked."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    run = setup(config, info)
    if info.is_main:
        prepare_run_dir(out, resume, overwrite)
    D.barrier()
    found = load_resume(out, resume)
    resume_path = found[0] if found else None
    ckpt = found[1] if found else None
    state = LoopState()
    if ckpt is not None:
        state = restore(run, ckpt)
    elif config.train.init_projections:
        _init_projections(run, int(config.train.init_projections))
    if info.is_main:
        save_config(run.cfg, out / "config.yaml")
    logger = TrainLogger(out, resume_step=state.step) if info.is_main else None
    eval_cfg = config.eval
    eval_ds = load_dataset(eval_cfg.data, eval_cfg.split, eval_cfg.images_root) if eval_cfg.data else None
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    del ckpt

    started = time.time()
    state = run_loop(run, out, state, logger, eval_ds)
    last = state.last
    reused = not last and state.step >= run.total_steps
    if reused:  # resumed a finished run: nothing trained now; report the run's logged final loss
        last = (read_log(out) or [{}])[-1]
    result = TrainResult(steps=state.step, final_total=last.get("total"), skipped_nonfinite=state.skipped,
                         skipped_samples=run.skipped_samples, seconds=time.time() - started,
                         student=out / "student", eval=state.metrics, reused=reused)
    if info.is_main:
        logger.close()
        plot_losses(out)
        from students import save_student

        save_student(run.student, out / "student")
        _print_result(result, out, resume_path)
    D.wait_for_main()
    D.cleanup()
    return result


def _print_result(result: TrainResult, out: Path, resume_path: Path | None) -> None:
    rsum = f", eval rsum {result.eval['rsum']:.2f}" if "rsum" in result.eval else ""
    final = f"{result.final_total:.4f}" if result.final_total is not None else "n/a"
    dropped = (f", {result.skipped_samples} samples with non-finite teacher targets dropped"
               if result.skipped_samples else "")
    if result.reused:
        print(f"distill: {out} already holds a finished run of {result.steps} steps (checkpoint {resume_path}); "
              "reused it without training (pass another --out, or a larger --steps, to train more)", flush=True)
    print(f"distill: {result.steps} steps, final total loss {final}, {result.skipped_nonfinite} skipped "
          f"non-finite{dropped}{rsum}; student saved to {result.student}", flush=True)


def train_from_argv(argv: Sequence[str] | None = None) -> TrainResult:
    """Parse a ``train_student`` command line and :func:`train`; returns the :class:`TrainResult`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cuda = torch.cuda.is_available() if cfg["device"] is None else str(cfg["device"]).startswith("cuda")
    if args.preset == "gpu" and not cuda:
        print("warning: --preset gpu is meant for a CUDA GPU (ViT-S/16 at 224 px, batch 256, bf16); on CPU use "
              "--preset cpu (or lower --batch-size and the student size)", file=sys.stderr)
    return train(cfg, args.resume, args.overwrite)


def INTERRUPTED_HINT(argv: Sequence[str]) -> str:  # noqa: N802 - read by distill.pipeline.cli.run_cli
    """What to do after Ctrl-C: resume, or start over when no checkpoint was written yet."""
    out = flag_value(argv, "--out")
    if out is not None and not has_checkpoint(out):
        return "no checkpoint was written yet: rerun with --overwrite to start over"
    return "resume with --resume auto"


def main(argv: Sequence[str] | None = None) -> int:
    """The command: train as ``argv`` says and return the exit status 0; errors are raised typed
    (:func:`distill.pipeline.cli.run_cli` turns them into one ``error:`` line and exit status 2)."""
    train_from_argv(argv)
    return 0


if __name__ == "__main__":
    cli_main(main)
