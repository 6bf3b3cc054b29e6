"""Constant loss weights from the config (default 1 for every term). Non-finite terms are left out
of the total for that step and reported with weight 0."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.core.registry import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import loss_values, option, term_mapping, weighted_total


@BALANCERS.register("fixed")
class FixedBalancer(Balancer):
    def __init__(self, names: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        weights = {n: option(f"weights.{n}", w, math.isfinite, "a finite number")
                   for n, w in term_mapping("weights", weights, names).items()}
        self.names = list(names)
        self.weights = [weights.get(n, 1.0) for n in self.names]

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        _, valid = loss_values(losses, self.names, torch.device("cpu"))
        applied = [w if ok else 0.0 for w, ok in zip(self.weights, valid.tolist())]
        return weighted_total(losses, self.names, applied, valid.tolist()), dict(zip(self.names, applied))
