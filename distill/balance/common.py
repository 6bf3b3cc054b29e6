"""Helpers shared by the balancers: checking term names, reading loss values and summing only the
finite terms (a NaN term times a zero weight would still be NaN)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def check_names(losses: dict[str, Tensor], names: Sequence[str]) -> None:
    """Raise a KeyError naming missing / unexpected terms."""
    if set(losses) != set(names):
        missing, extra = sorted(set(names) - set(losses)), sorted(set(losses) - set(names))
        raise KeyError(f"balancer expects terms {list(names)}; missing {missing}, unexpected {extra}")


def loss_values(losses: dict[str, Tensor], names: Sequence[str], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Detached values [K] in ``names`` order and a [K] bool mask of the finite ones."""
    check_names(losses, names)
    values = torch.stack([losses[n].detach().reshape(()).to(device, dtype) for n in names])
    return values, torch.isfinite(values)


def weighted_total(losses: dict[str, Tensor], names: Sequence[str], weights: Sequence[float],
                   valid: Sequence[bool]) -> Tensor:
    """``sum_i w_i * L_i`` over the valid terms; a zero (grad-requiring) scalar when none is valid,
    so ``backward`` is a no-op."""
    terms = [losses[n] * w for n, w, ok in zip(names, weights, valid) if ok]
    if not terms:
        ref = next(iter(losses.values()))
        return torch.zeros((), device=ref.device, requires_grad=True)
    return torch.stack([t.reshape(()) for t in terms]).sum()
