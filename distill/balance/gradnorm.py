"""GradNorm (Chen et al. 2018): task weights adapted so that the gradient norms of the weighted
terms on ``shared_params`` follow each term's relative training rate.

Each step, for every finite term: ``g_i = ||grad_W L_i||`` over the shared parameters (via
``torch.autograd.grad(..., retain_graph=True)``), so the weighted norm is ``G_i = w_i * g_i``;
``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` and the target is ``mean(G) * r_i ** alpha`` (a
constant). The GradNorm objective ``sum_i |G_i - target_i|`` has gradient ``sign(G_i - target_i) * g_i``
w.r.t. ``w_i``; the weights take one Adam step on it (``lr``, default 0.025), are kept >= ``min_weight``
and renormalised to sum K. The returned total uses the weights from before this update (detached).

The weights and the Adam moments are buffers, not parameters: the main optimizer must not train
them, and ``state_dict`` resumes them exactly. Non-finite terms get weight 0 for the step and are not
updated. Cost: one extra backward per term, down to the shared parameters only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.balance import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import loss_values, weighted_total


def grad_norm(loss: Tensor, params: Sequence[nn.Parameter]) -> float:
    """L2 norm of d loss / d params (0 where the loss does not depend on them)."""
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


class GradNormBalancer(Balancer):
    def __init__(self, names: list[str], alpha: float = 1.5, lr: float = 0.025,
                 betas: tuple[float, float] = (0.9, 0.999), min_weight: float = 1e-3) -> None:
        super().__init__()
        self.names = list(names)
        self.alpha, self.lr, self.betas, self.min_weight = alpha, lr, tuple(betas), min_weight
        k = len(self.names)
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(k, dtype=torch.float64))  # L_i(0); 0 = not yet seen
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_steps", torch.zeros(k, dtype=torch.long))

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        if not shared_params:
            raise ValueError("gradnorm balancer needs shared_params (e.g. student.shared_parameters())")
        values, valid = loss_values(losses, self.names, self.weights.device, torch.float64)
        applied = torch.where(valid, self.weights, torch.zeros_like(self.weights)).tolist()
        total = weighted_total(losses, self.names, applied, valid.tolist())
        norms = torch.tensor([grad_norm(losses[n].reshape(()), shared_params) if ok else 0.0
                              for n, ok in zip(self.names, valid.tolist())],
                             dtype=torch.float64, device=self.weights.device)
        self._step(values, valid, norms)
        return total, dict(zip(self.names, applied))

    @torch.no_grad()
    def _step(self, values: Tensor, valid: Tensor, norms: Tensor) -> None:
        if not bool(valid.any()):
            return
        record = valid & (self.initial <= 0) & (values > 0)
        self.initial.copy_(torch.where(record, values, self.initial))
        known = valid & (self.initial > 0)
        ratio = torch.where(known, values / torch.where(known, self.initial, 1.0), torch.ones_like(values))
        mean_ratio = ratio[valid].mean()
        rate = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)
        norms = torch.nan_to_num(norms, nan=0.0, posinf=0.0)
        weighted = self.weights * norms
        target = weighted[valid].mean() * rate.clamp_min(0) ** self.alpha
        grad = torch.where(valid, torch.sign(weighted - target) * norms, torch.zeros_like(norms))
        b1, b2 = self.betas
        self.adam_steps += valid.long()
        self.adam_m.copy_(torch.where(valid, b1 * self.adam_m + (1 - b1) * grad, self.adam_m))
        self.adam_v.copy_(torch.where(valid, b2 * self.adam_v + (1 - b2) * grad**2, self.adam_v))
        steps = self.adam_steps.clamp_min(1).double()
        m_hat, v_hat = self.adam_m / (1 - b1**steps), self.adam_v / (1 - b2**steps)
        update = torch.where(valid, self.lr * m_hat / (v_hat.sqrt() + 1e-8), torch.zeros_like(m_hat))
        new = (self.weights - update).clamp_min(self.min_weight)
        self.weights.copy_(new * (len(self.names) / new.sum()))


@BALANCERS.register("gradnorm")
def build(names: list[str], **cfg) -> GradNormBalancer:
    return GradNormBalancer(names, **cfg)
