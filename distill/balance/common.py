"""Helpers shared by the balancers: checking options and term names, reading loss values, gradient norms and summing
only the finite terms (a NaN term times a zero weight would still be NaN)."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError


def option(key: str, value: Any, ok: Callable[[float], bool], need: str) -> float:
    """``value`` of option ``key`` as a float; a :class:`ConfigError` naming ``balancer.cfg.<key>``
    (the config key of a one-stage config; re-rooted for a stage) unless it is a real number with ``ok``."""
    number = value
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number) or not ok(float(number)):
        raise ConfigError(f"balancer.cfg.{key} must be {need}, got {value!r}")
    return float(number)


def term_mapping(key: str, given: Any, names: Sequence[str]) -> dict[str, Any]:
    """Option ``key`` as a ``{term: value}`` mapping whose names are all configured loss terms."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"balancer.cfg.{key} must map loss names to numbers, got {given!r}")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"balancer.cfg.{key}: weights given for unknown terms {unknown}; terms are {list(names)}")
    return dict(given)


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


def grad_norm(loss: Tensor, params: Sequence[nn.Parameter], scale: float = 1.0) -> Tensor:
    """L2 norm of d loss / d params as a float64 scalar tensor (0 where the loss does not depend on
    them), measured on ``loss * scale`` and divided by ``scale`` (no host sync)."""
    if not loss.requires_grad:
        return torch.zeros((), dtype=torch.float64, device=loss.device)
    grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, list(params), retain_graph=True,
                                allow_unused=True)
    squares = [g.double().pow(2).sum() for g in grads if g is not None]
    if not squares:
        return torch.zeros((), dtype=torch.float64, device=loss.device)
    return torch.stack(squares).sum().sqrt() / scale
