"""Deterministic adaptive average pooling.

``F.adaptive_avg_pool2d`` has no deterministic CUDA backward (it raises under
``torch.use_deterministic_algorithms(True)``). :func:`adaptive_avg_pool2d` computes the same
result from operations whose backward is deterministic: a reshape + mean when the output grid
divides the input grid, otherwise two matmuls with the explicit pooling matrices (the bins of
``adaptive_avg_pool2d``: ``floor(i * n / m)`` to ``ceil((i + 1) * n / m)``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def pooling_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """[n_out, n_in] matrix whose row ``i`` averages the ``i``-th adaptive-pooling bin."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"pooling sizes must be positive, got {n_in} -> {n_out}")
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=device)
    inside = (j.unsqueeze(0) >= start.unsqueeze(1)) & (j.unsqueeze(0) < end.unsqueeze(1))
    return (inside.to(dtype) / (end - start).unsqueeze(1).to(dtype))


def adaptive_avg_pool2d(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for ``x`` [..., H, W] with a deterministic backward."""
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    if h % oh == 0 and w % ow == 0:
        return x.reshape(*x.shape[:-2], oh, h // oh, ow, w // ow).mean(dim=(-3, -1))
    ph = pooling_matrix(h, oh, x.dtype, x.device)
    pw = pooling_matrix(w, ow, x.dtype, x.device)
    return ph @ x @ pw.T
