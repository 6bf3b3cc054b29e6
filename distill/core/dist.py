"""torchrun helpers: process-group setup, rank info, and collective helpers that are no-ops
when running as a single process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        init_wait_group()
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
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
    if not (dist.is_available() and dist.is_initialized()):
        return
    if _wait_group is None:
        dist.barrier()
    else:
        dist.barrier(group=_wait_group)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` unchanged in a single process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0, keeping this rank's slice
    differentiable (the others are detached copies)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


def cleanup() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None
