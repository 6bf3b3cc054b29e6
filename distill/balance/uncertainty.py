"""Homoscedastic-uncertainty weighting (Kendall et al. 2018): one learned log-variance ``s_i`` per
term, ``total = sum_i exp(-s_i) * L_i + s_i``. The ``log_vars`` parameter is trained by the main
optimizer (include the balancer's parameters); reported weights are ``exp(-s_i)``. Non-finite
terms are left out of the total for that step and reported with weight 0."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.core.registry import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import loss_values, option


@BALANCERS.register("uncertainty")
class UncertaintyBalancer(Balancer):
    def __init__(self, names: list[str], init: float = 0.0) -> None:
        super().__init__()
        init = option("init", init, math.isfinite, "a finite number (the initial log-variance)")
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.full((len(self.names),), init))

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        _, valid = loss_values(losses, self.names, self.log_vars.device)
        terms = [torch.exp(-self.log_vars[i]) * losses[n].reshape(()) + self.log_vars[i]
                 for i, n in enumerate(self.names) if valid[i]]
        total = torch.stack(terms).sum() if terms else self.log_vars.sum() * 0.0
        weights = torch.where(valid, torch.exp(-self.log_vars.detach()), torch.zeros_like(self.log_vars))
        return total, dict(zip(self.names, weights.tolist()))
