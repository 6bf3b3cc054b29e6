"""Everything distributed, in one module: torchrun process-group setup and rank info, the one
"is a process group initialised" check (:func:`is_dist`), barriers, and the collectives every layer
uses (:func:`all_reduce_mean`, :func:`all_reduce`, :func:`all_gather`, the differentiable
:func:`gather_with_grad`). Every helper is a no-op (returns its input) in a single process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1):
    NCCL on CUDA, gloo on CPU. ``device`` of None picks CUDA when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        # torchrun: one GPU per local rank; a single process keeps an explicit index (cuda:1)
        dev = torch.device("cuda", local if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not is_dist():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        init_wait_group()
    return DistInfo(rank, world, local, dev)


def is_dist() -> bool:
    """Whether a default process group is initialised (torchrun, or a test's ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 in a single process)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


#: How long the other ranks wait for rank 0's solo work (evaluation, checkpoint and student writes).
WAIT_TIMEOUT = datetime.timedelta(hours=12)
_wait_group: object | None = None


def init_wait_group(timeout: datetime.timedelta = WAIT_TIMEOUT) -> None:
    """Create (collectively, on every rank) the gloo group :func:`wait_for_main` waits on."""
    global _wait_group
    _wait_group = dist.new_group(backend="gloo", timeout=timeout)


def wait_for_main() -> None:
    """Barrier after work that only rank 0 does: a CPU (gloo) barrier with a long timeout, so the
    waiting ranks do not hit the NCCL watchdog's timeout during a long evaluation (a plain
    :func:`barrier` when no wait group was made)."""
    if not is_dist():
        return
    if _wait_group is None:
        dist.barrier()
    else:
        dist.barrier(group=_wait_group)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` unchanged in a single process)."""
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """``t`` reduced in place over ranks with ``op`` (default: sum); ``t`` unchanged in a single process."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0, without gradient (``t``
    itself in a single process or a world of one)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the gradient, first
    summed over ranks when ``sum_grads``."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, sum_grads: bool) -> torch.Tensor:
        ctx.rank, ctx.n, ctx.sum_grads = dist.get_rank(), t.shape[0], sum_grads
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.sum_grads:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_with_grad(t: torch.Tensor, sum_grads: bool = False) -> torch.Tensor:
    """The differentiable all-gather: ``t`` of every rank concatenated along dim 0 (rank order),
    where this rank's slice keeps its gradient (``t`` itself in a single process).

    ``sum_grads=False``: the gradient of this rank's slice is this rank's own (the other slices act
    as constants): right for a loss each rank computes over its own rows against the gathered
    candidates. ``sum_grads=True``: the backward all-reduces (sums) the gradient first, so this
    rank's slice gets the gradient of every rank's use of it: right when every rank computes the
    same global loss on the gathered batch (:mod:`distill.distiller`), where DDP's averaging then
    yields the gradient of that loss. A tensor without gradient is gathered plainly."""
    if world_size() == 1:
        return t
    if not t.requires_grad:
        return all_gather(t)
    return _GatherWithGrad.apply(t, sum_grads)


def cleanup() -> None:
    global _wait_group
    if is_dist():
        dist.destroy_process_group()
    _wait_group = None
