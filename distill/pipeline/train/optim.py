"""The optimizer side of training: parameter groups and fused AdamW, the LR schedule (linear
warm-up, then cosine decay to ``train.min_lr_ratio``), the fp16 gradient scaler and gradient
clipping."""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError

#: Parameters of a stage's balancer (``balancer.*`` or ``stages.<i>.balancer.*``): no weight decay.
_BALANCER = re.compile(r"^(stages\.\d+\.)?balancer\.")


def _get(train: Any, key: str) -> Any:
    """``train.<key>`` of a :class:`~distill.pipeline.train.config.TrainConfig` or a ``train`` dict."""
    return train[key] if isinstance(train, dict) else getattr(train, key)


def warmup_steps(value: int | float, total: int) -> int:
    """LR warm-up steps of ``train.warmup_steps`` for a run of ``total`` steps: an int is a step
    count, a float in [0, 1) a fraction of the run (at least 1 step when positive)."""
    if isinstance(value, float):
        return max(1, round(value * total)) if value > 0 else 0
    return int(value)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in two groups: with ``weight_decay``, and without it
    (norms, biases and other vectors, the logit scale and balancer parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or bool(_BALANCER.match(name))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, train: Any) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (fused kernel: one pass over all tensors instead of a Python
    loop per tensor); ``train`` is a ``TrainConfig`` or a ``train`` dict (lr, betas, eps, weight_decay)."""
    return torch.optim.AdamW(param_groups(model, _get(train, "weight_decay")), lr=float(_get(train, "lr")),
                             betas=tuple(float(b) for b in _get(train, "betas")), eps=float(_get(train, "eps")),
                             fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, train: Any, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step LR schedule of a run of ``total`` optimizer steps (:func:`lr_factor`)."""
    warmup, min_ratio = warmup_steps(_get(train, "warmup_steps"), total), float(_get(train, "min_lr_ratio"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler: active for fp16 (CUDA only; :class:`ConfigError` elsewhere)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, device: torch.device) -> Tensor:
    """Clip the gradients of ``params`` (those that have one) to ``max_norm`` (0: no clipping) and
    return their total norm as a float32 device tensor (no host sync)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm) or math.inf).float()
