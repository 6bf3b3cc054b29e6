"""The training loop: :func:`train_step` (``accum_steps`` micro-batches through the distiller's
active stage, backward, clipping, the non-finite guard, the optimizer step) and :func:`run_loop`
(steps until ``train.steps`` with logging, stage switches, the periodic evaluation hook and the
checkpoint hook), on a :class:`Run` built by :func:`distill.pipeline.train.main.setup`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from distill.core import dist as D
from distill.core.cache.reader import TeacherCache
from distill.core.checkpoint import checkpoint_payload, save_checkpoint
from distill.core.data.pixels import student_pixels
from distill.core.errors import NonFiniteTargetError
from distill.distiller import Distiller
from distill.pipeline.train.config import TrainRunConfig
from distill.pipeline.train.data import GlobalBatchSampler, TrainBatch
from distill.pipeline.train.grad_share import grad_shares
from distill.pipeline.train.log import TrainLogger
from distill.pipeline.train.optim import autocast_dtype, clip_gradients
from distill.pipeline.train.run_dir import prune_checkpoints
from distill.pipeline.train.target_check import screen_batch


@dataclass
class Run:
    """Everything a training run holds."""

    config: TrainRunConfig
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

    @property
    def cfg(self) -> dict[str, Any]:
        """The run's config as a dict (what ``config.yaml`` and checkpoints store)."""
        return self.config.to_dict()


def epoch_batches(run: Run, epoch: int, position: int) -> Iterator[tuple[int, int, TrainBatch]]:
    """Endless (epoch, position after this batch, batch), starting ``position`` batches into ``epoch``."""
    while True:
        run.sampler.set_epoch(epoch, position)
        for batch in run.loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


# -- one step -------------------------------------------------------------------------------------
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
    """One optimizer step over ``accum_steps`` micro-batches, with the losses and balancer of the
    stage that trains ``step``.

    Returns (log fields, epoch, position, applied); ``applied`` is False when the loss or the
    gradients were non-finite and the update was skipped."""
    train = run.config.train
    accum, device = train.accum_steps, run.info.device
    dtype = autocast_dtype(train.precision)
    snap = _state_snapshot(run.distiller)
    balancer = run.distiller.stage_at(step).balancer
    balancer.begin_step(run.scaler.get_scale() if balancer.uses_loss_scale and run.scaler.is_enabled() else 1.0)
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    total_sum = torch.zeros((), device=device)
    share: dict[str, Tensor] = {}
    measure = bool(train.grad_share_every) and (step + 1) % train.grad_share_every == 0 \
        and not isinstance(run.model, DistributedDataParallel)
    epoch = position = 0
    for micro in range(accum):
        epoch, position, batch = _next_finite_batch(run, batches)
        if batch.text is None:
            raise ValueError("the training batch holds no tokenized captions: build the loader's TeacherCollate "
                             "with the student's tokenize")
        pixels = student_pixels(batch, run.student, device)
        if train.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        sync = run.model.no_sync() if isinstance(run.model, DistributedDataParallel) and micro < accum - 1 \
            else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = run.model(pixels, batch.text, batch.teacher, batch.image_index, step, run.total_steps)
            if measure and micro == accum - 1:
                share = grad_shares(out.total, out.losses, [p for p in run.student.parameters() if p.requires_grad])
            run.scaler.scale(out.total / accum).backward()
        total_sum = total_sum + out.total.detach().float()
        for name, value in out.losses.items():
            sums[name] = sums[name] + value.detach().float() if name in sums else value.detach().float()
        weights = dict(out.weights)
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(run.distiller.parameters(), train.grad_clip, device)
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
    fields = {"lr": lr, "stage": run.distiller.stage_index(step) + 1,
              **{f"loss/{k}": v / accum for k, v in sums.items()},
              **{f"weight/{k}": float(v) for k, v in weights.items()}, "total": total_sum / accum, "grad_norm": grad_norm,
              "skipped_samples": run.skipped_samples, **share}
    return fields, epoch, position, applied


def _next_finite_batch(run: Run, batches: Iterator[tuple[int, int, TrainBatch]]) -> tuple[int, int, TrainBatch]:
    """The next batch on the device with its non-finite teacher targets handled per
    ``data.on_nonfinite`` (error: raise; skip: drop those rows, counted in ``run.skipped_samples``)."""
    for _ in range(max(1, run.sampler.batches_per_epoch()) + 1):
        epoch, position, batch = next(batches)
        batch, dropped = screen_batch(batch.to(run.info.device), run.cache, run.config.data.on_nonfinite)
        run.skipped_samples += dropped
        if len(batch.texts):
            return epoch, position, batch
    raise NonFiniteTargetError(f"teacher cache {run.cache.path}: a whole epoch of batches had only non-finite "
                               "teacher targets; rebuild the cache")


# -- hooks ----------------------------------------------------------------------------------------
def evaluate(run: Run, eval_ds: Any) -> dict[str, float]:
    """Retrieval metrics of the student on the validation split (rank 0; the others wait)."""
    metrics: dict[str, float] = {}
    if run.info.is_main:
        from distill.pipeline.evaluate import evaluate_model

        was_training = run.student.training
        run.student.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate_model(run.student, eval_ds, run.config.eval.batch_size,
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


def source(run: Run) -> dict[str, str]:
    """The teacher, dataset and storage/view settings the run's cache was built with (a resume must
    use the same; :func:`distill.pipeline.train.run_dir.check_resume_source`)."""
    return {"teacher_hash": run.cache.teacher_hash, "dataset_fingerprint": run.cache.dataset_fingerprint,
            "cache_settings": json.dumps(run.cache.settings(), sort_keys=True)}


def checkpoint_state(run: Run, epoch: int, position: int, skipped: int) -> dict[str, Any]:
    """The run's checkpoint content (:func:`distill.core.checkpoint.checkpoint_payload`)."""
    return checkpoint_payload(
        student=run.student.state_dict(), student_config=run.student.config(),
        stages=[{"losses": s.losses.state_dict(), "balancer": s.balancer.state_dict()} for s in run.distiller.stages],
        shared=run.distiller.shared_state_dict(), config=run.cfg, optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(), epoch=epoch, position=position,
        skipped_nonfinite=skipped, skipped_samples=run.skipped_samples, source=source(run))


def save_run_checkpoint(run: Run, out: Path, step: int, epoch: int, position: int, skipped: int) -> None:
    """The checkpoint hook: rank 0 writes ``OUT/checkpoints/step_XXXXXX.pt`` (+ ``latest.pt``) and
    prunes to ``train.keep_checkpoints``; every rank waits for it."""
    if run.info.is_main:
        save_checkpoint(out, step, checkpoint_state(run, epoch, position, skipped))
        prune_checkpoints(out, run.config.train.keep_checkpoints)
    D.wait_for_main()


def _log_eval(run: Run, logger: TrainLogger | None, eval_ds: Any, step: int) -> dict[str, float]:
    metrics = evaluate(run, eval_ds)
    if logger:
        logger.log({"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    return metrics


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where :func:`run_loop` starts (from a checkpoint or 0) and where it ended."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    skipped: int = 0  # optimizer steps skipped for non-finite losses/gradients
    last: dict[str, Any] = field(default_factory=dict)  # the last logged train record
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation


def run_loop(run: Run, out: Path, state: LoopState, logger: TrainLogger | None, eval_ds: Any = None) -> LoopState:
    """Train from ``state.step`` to ``run.total_steps``: log every ``train.log_every`` steps (and the
    last), announce each stage switch, evaluate every ``eval.every`` steps (or once at the end when
    0), checkpoint every ``train.checkpoint_every`` steps (and the last)."""
    train_cfg, eval_cfg, info = run.config.train, run.config.eval, run.info
    global_batch = train_cfg.batch_size * train_cfg.accum_steps
    batches = epoch_batches(run, state.epoch, state.position)
    run.distiller.train()
    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=state.step, disable=not info.is_main, desc="distill", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    interval_steps, interval_s = 0, 0.0  # training steps and their seconds since the last log step
    while state.step < run.total_steps:
        t0 = time.time()
        fields, state.epoch, state.position, applied = train_step(run, batches, state.step)
        state.skipped += not applied
        state.step += 1
        step = state.step
        interval_steps, interval_s = interval_steps + 1, interval_s + time.time() - t0
        bar.update(1)
        if step % train_cfg.log_every == 0 or step == run.total_steps:  # the only host copy of the log values
            rate = global_batch * interval_steps / max(interval_s, 1e-9)
            interval_steps, interval_s = 0, 0.0
            state.last = host_fields({"kind": "train", "step": step, "epoch": state.epoch, **fields,
                                      "samples_per_s": rate, "skipped_nonfinite": state.skipped})
            if logger:
                logger.log(state.last)
            bar.set_postfix(loss=f"{state.last['total']:.4f}", samples_s=f"{rate:.0f}", skipped=state.skipped)
        if step in run.distiller.boundaries and info.is_main:
            i = run.distiller.boundaries.index(step)
            done, now = run.distiller.stages[i], run.distiller.stages[i + 1]
            bar.write(f"distill: {run.distiller.stage_label(i)} done after {step} steps ({', '.join(done.losses)}); "
                      f"now training with {', '.join(now.losses)}")
        if eval_ds is not None and eval_cfg.every and (step % eval_cfg.every == 0 or step == run.total_steps):
            state.metrics = _log_eval(run, logger, eval_ds, step)
            if logger:
                bar.write(format_eval(step, state.metrics, float(fields["total"])))
        if step % train_cfg.checkpoint_every == 0 or step == run.total_steps:
            save_run_checkpoint(run, out, step, state.epoch, state.position, state.skipped)
    bar.close()
    if eval_ds is not None and not eval_cfg.every:
        state.metrics = _log_eval(run, logger, eval_ds, state.step)
        if logger:
            print(format_eval(state.step, state.metrics, state.last.get("total")), flush=True)
    return state
