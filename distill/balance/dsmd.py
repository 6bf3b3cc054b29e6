"""``dsmd``: the loss-balancing formula of the released DSMD code (dynamic self-adaptive multiscale
distillation, arXiv 2404.10838), kept for reproducing that method; it was this project's ``dynamic``
balancer before ``dynamic`` was redesigned (see distill/balance/dynamic.py for why).

Magnitude normalisation x loss-descent-rate softmax, EMA. At every step, without gradient through
the weights, for the K terms with losses ``L_i(t)``:

* magnitude normalisation ``m_i = max_j L_j(t) / L_i(t)`` (every weighted term gets the magnitude of
  the largest one);
* descent rate (DWA) ``r_i = L_i(t-1) / L_i(t-2)`` on the RAW losses (rates on magnitude-normalised
  losses would all be equal), ``r_i = 1`` until a term has two past values;
  ``d_i = K * softmax(r / T)_i``: a term whose loss descends slowly (higher ``r``) gets more weight;
* target ``w_i ∝ m_i * d_i``, normalised to ``sum_i w_i = K``;
* smoothed ``ema_i = beta * ema_i + (1 - beta) * w_i`` (the first target of a term initialises it),
  and the applied weight is ``clamp(ema_i, min_weight, max_weight)``.

A term whose loss is non-finite or <= 0 gets weight 0 for that step and leaves every state entry
of that term untouched (its history, EMA), so the state stays finite. All state (loss history, EMA,
seen flags) lives in float64 buffers so ``state_dict`` resumes with bit-identical next weights.

Known behaviour (measured): since every ``w_i`` is proportional to ``1 / L_i``, every weighted term
gets the same value and a loss heading to zero (a triplet hinge, feature L1) takes the weight budget
while the retrieval-shaping contrastive terms starve; the one-step rate ``L(t-1) / L(t-2)`` is mostly
minibatch noise.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.core.registry import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import loss_values, option, weighted_total


@BALANCERS.register("dsmd")
class DSMDBalancer(Balancer):
    def __init__(self, names: list[str], temperature: float = 2.0, beta: float = 0.9,
                 min_weight: float = 0.0, max_weight: float = math.inf) -> None:
        super().__init__()
        temperature = option("temperature", temperature, lambda v: 0 < v < math.inf, "a number > 0")
        beta = option("beta", beta, lambda v: 0 <= v < 1, "a number in [0, 1)")
        min_weight = option("min_weight", min_weight, lambda v: v >= 0, "a number >= 0")
        max_weight = option("max_weight", max_weight, lambda v: v >= min_weight, f"a number >= min_weight ({min_weight:g})")
        self.names = list(names)
        self.temperature, self.beta = temperature, beta
        self.min_weight, self.max_weight = min_weight, max_weight
        k = len(self.names)
        self.register_buffer("prev1", torch.zeros(k, dtype=torch.float64))  # L(t-1); 0 = unknown
        self.register_buffer("prev2", torch.zeros(k, dtype=torch.float64))  # L(t-2); 0 = unknown
        self.register_buffer("ema", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))

    def descent_rates(self) -> Tensor:
        """``r_i = L_i(t-1) / L_i(t-2)`` from the raw loss history (1 where unknown)."""
        known = (self.prev1 > 0) & (self.prev2 > 0)
        return torch.where(known, self.prev1 / torch.where(known, self.prev2, 1.0), torch.ones_like(self.prev1))

    def target_weights(self, values: Tensor, valid: Tensor) -> Tensor:
        """Unsmoothed weights ``∝ m_i * d_i`` summing to K over the valid terms (0 for the others)."""
        if not bool(valid.any()):
            return torch.zeros_like(values)
        safe = torch.where(valid, values, torch.ones_like(values))
        magnitude = torch.where(valid, values[valid].max() / safe, torch.zeros_like(values))
        logits = torch.where(valid, self.descent_rates() / self.temperature, torch.full_like(values, -math.inf))
        descent = len(self.names) * torch.softmax(logits, dim=0)
        raw = magnitude * descent
        target = raw * (len(self.names) / raw.sum())
        return torch.where(valid & torch.isfinite(target), target, torch.zeros_like(target))

    @torch.no_grad()
    def _update(self, values: Tensor, valid: Tensor) -> Tensor:
        """Advance the state by one step and return the weights to apply."""
        target = self.target_weights(values, valid)
        smoothed = torch.where(self.seen, self.beta * self.ema + (1 - self.beta) * target, target)
        self.ema.copy_(torch.where(valid, smoothed, self.ema))
        self.seen |= valid
        self.prev2.copy_(torch.where(valid, self.prev1, self.prev2))
        self.prev1.copy_(torch.where(valid, values, self.prev1))
        return torch.where(valid, self.ema.clamp(self.min_weight, self.max_weight), torch.zeros_like(self.ema))

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        values, finite = loss_values(losses, self.names, self.prev1.device, torch.float64)
        valid = finite & (values > 0)
        weights = self._update(torch.where(valid, values, torch.zeros_like(values)), valid).tolist()
        return weighted_total(losses, self.names, weights, valid.tolist()), dict(zip(self.names, weights))
