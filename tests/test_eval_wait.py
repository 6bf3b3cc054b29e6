"""Rank 0's solo work (evaluation, checkpoints) is waited for on a long-timeout gloo group, and the
ranking matmuls run in full float32 precision whatever TF32 / oneDNN settings the process has."""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.core import dist as D
from distill.core.metrics import full_precision_matmul, retrieval_ranks
from tests.helpers.procs import free_port


def _settable(backend, value: str) -> bool:
    try:
        backend.fp32_precision = value
        return True
    except (AttributeError, RuntimeError, ValueError):
        return False


def test_full_precision_matmul_restores_the_settings():
    cuda, onednn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda.fp32_precision, onednn.fp32_precision
    try:
        assert _settable(cuda, "tf32") and _settable(onednn, "bf16")
        with full_precision_matmul():
            assert (cuda.fp32_precision, onednn.fp32_precision) == ("ieee", "ieee")
        assert (cuda.fp32_precision, onednn.fp32_precision) == ("tf32", "bf16")
        with pytest.raises(KeyError):
            with full_precision_matmul():
                raise KeyError("x")
        assert (cuda.fp32_precision, onednn.fp32_precision) == ("tf32", "bf16")
        g = torch.Generator().manual_seed(0)
        img, txt = torch.randn(6, 8, generator=g), torch.randn(12, 8, generator=g)
        cap = torch.arange(12) // 2
        seen = []
        orig = torch.Tensor.__matmul__

        def spy(a, b):
            seen.append((cuda.fp32_precision, onednn.fp32_precision))
            return orig(a, b)

        torch.Tensor.__matmul__ = spy
        try:
            i2t, t2i = retrieval_ranks(img, txt, cap)
        finally:
            torch.Tensor.__matmul__ = orig
        assert seen and set(seen) == {("ieee", "ieee")}
        assert (cuda.fp32_precision, onednn.fp32_precision) == ("tf32", "bf16")
        ref = (img @ txt.T)  # every score differs: ranks are plain sort positions
        assert t2i.tolist() == [int((ref[:, j] > ref[cap[j], j]).sum()) for j in range(12)]
    finally:
        cuda.fp32_precision, onednn.fp32_precision = saved


def _worker(rank: int, port: int, use_wait_group: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    if use_wait_group:
        D.init_wait_group()
    try:
        if rank == 0:
            time.sleep(5)  # a long "evaluation", longer than the default group's timeout
        D.wait_for_main()
        results[rank] = "ok"
    except RuntimeError as e:
        results[rank] = f"error: {e}"
    finally:
        D.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("use_wait_group", [False, True])
def test_waiting_ranks_outlast_the_collective_timeout(use_wait_group):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), use_wait_group, results), nprocs=2, join=True)
    if use_wait_group:
        assert dict(results) == {0: "ok", 1: "ok"}
    else:  # the plain barrier on the default group times out on the waiting rank
        assert results[1].startswith("error")
