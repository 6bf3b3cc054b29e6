"""GradNorm (Chen et al. 2018): task weights adapted so that the gradient norms of the weighted
terms on ``shared_params`` follow each term's relative training rate.

Each forward, for every finite term: ``g_i = ||grad_W L_i||`` over the shared parameters (via
``torch.autograd.grad(..., retain_graph=True)``), so the weighted norm is ``G_i = w_i * g_i``;
``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` and the target is ``mean(G) * r_i ** alpha`` (a
constant). The GradNorm objective ``sum_i |G_i - target_i|`` has gradient ``sign(G_i - target_i) * g_i``
w.r.t. ``w_i``; the weights take one Adam step on it (``lr``, default 0.025), are kept >= ``min_weight``
and renormalised to sum K. The returned total uses the weights from before this update (detached).

Inside the trainer (:meth:`begin_step` ... :meth:`end_step`) the norms are measured on the losses
times the GradScaler's loss scale (as the real backward is: fp16 gradients that would underflow
unscaled do not) and divided by it again, the values and norms of the micro-steps are averaged, and
the weights take one step per optimizer step, after it, only when it was applied and every measured
norm is finite (an inf/NaN gradient under a too-large loss scale is the scaler's business, not a
measurement). Called on its own (no ``begin_step``) every forward is one update, as before.

The weights and the Adam moments are buffers, not parameters: the main optimizer must not train
them, and ``state_dict`` resumes them exactly. Non-finite terms get weight 0 for the step and are not
updated. Cost: one extra backward per term, down to the shared parameters only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.core.registry import BALANCERS
from distill.balance.base import Balancer
from distill.balance.common import grad_norm, loss_values, option, weighted_total
from distill.core.errors import ConfigError


@BALANCERS.register("gradnorm")
class GradNormBalancer(Balancer):
    uses_loss_scale = True
    #: changed only in ``end_step`` of an applied step (or by a direct call), so the trainer need
    #: not snapshot them to undo a skipped step
    rollback_exempt = ("weights", "initial", "adam_m", "adam_v", "adam_steps")

    def __init__(self, names: list[str], alpha: float = 1.5, lr: float = 0.025,
                 betas: tuple[float, float] = (0.9, 0.999), min_weight: float = 1e-3) -> None:
        super().__init__()
        alpha = option("alpha", alpha, lambda v: 0 <= v < math.inf, "a number >= 0")
        lr = option("lr", lr, lambda v: 0 < v < math.inf, "a number > 0")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"balancer.cfg.betas must be two numbers in [0, 1), got {betas!r}")
        betas = tuple(option("betas", b, lambda v: 0 <= v < 1, "two numbers in [0, 1)") for b in betas)
        min_weight = option("min_weight", min_weight, lambda v: 0 <= v < 1, "a number in [0, 1)")
        self.names = list(names)
        self.alpha, self.lr, self.betas, self.min_weight = alpha, lr, betas, min_weight
        k = len(self.names)
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(k, dtype=torch.float64))  # L_i(0); 0 = not yet seen
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_steps", torch.zeros(k, dtype=torch.long))
        self._scale = 1.0
        self._pending: dict[str, Tensor] | None = None  # micro-step sums between begin_step and end_step

    def begin_step(self, loss_scale: float = 1.0) -> None:
        self._scale = float(loss_scale)
        k, dev = len(self.names), self.weights.device
        self._pending = {"values": torch.zeros(k, dtype=torch.float64, device=dev),
                         "norms": torch.zeros(k, dtype=torch.float64, device=dev),
                         "count": torch.zeros(k, dtype=torch.float64, device=dev),
                         "finite": torch.ones((), dtype=torch.bool, device=dev)}

    def end_step(self, applied: bool) -> None:
        pending, self._pending, self._scale = self._pending, None, 1.0
        if pending is None or not applied:
            return
        valid = pending["count"] > 0
        n = pending["count"].clamp_min(1)
        self._step(pending["values"] / n, valid, pending["norms"] / n, pending["finite"])

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:
        if not shared_params:
            raise ConfigError("gradnorm balancer needs shared_params (e.g. student.shared_parameters())")
        values, valid = loss_values(losses, self.names, self.weights.device, torch.float64)
        k = len(self.names)
        host = torch.cat([valid.double(), torch.where(valid, self.weights, torch.zeros_like(self.weights))]).tolist()
        valid_list, applied = [v > 0 for v in host[:k]], host[k:]  # one host copy for both
        total = weighted_total(losses, self.names, applied, valid_list)
        zero = torch.zeros((), dtype=torch.float64, device=self.weights.device)
        norms = torch.stack([grad_norm(losses[n].reshape(()), shared_params, self._scale).to(zero.device) if ok else zero
                             for n, ok in zip(self.names, valid_list)])
        finite = torch.isfinite(norms).all()
        if self._pending is None:
            self._step(values, valid, norms, finite)
        else:
            p = self._pending
            p["values"] += torch.where(valid, values, zero)
            p["norms"] += torch.where(valid, norms, zero)
            p["count"] += valid.double()
            p["finite"] &= finite
        return total, dict(zip(self.names, applied))

    @torch.no_grad()
    def _step(self, values: Tensor, valid: Tensor, norms: Tensor, finite: Tensor) -> None:
        """One Adam step of the weights; skipped (state untouched) when no term is valid or a
        measured norm is not finite. Written without host syncs (``torch.where`` on ``ok``)."""
        ok = valid.any() & finite
        valid = valid & ok
        values = torch.where(valid, values, torch.ones_like(values))
        norms = torch.where(valid, norms, torch.zeros_like(norms))
        record = valid & (self.initial <= 0) & (values > 0)
        self.initial.copy_(torch.where(record, values, self.initial))
        known = valid & (self.initial > 0)
        ratio = torch.where(known, values / torch.where(known, self.initial, 1.0), torch.ones_like(values))
        count = valid.double().sum().clamp_min(1)
        mean_ratio = torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / count
        rate = torch.where(mean_ratio > 0, ratio / torch.where(mean_ratio > 0, mean_ratio, 1.0), torch.ones_like(ratio))
        weighted = self.weights * norms
        target = torch.where(valid, weighted, torch.zeros_like(weighted)).sum() / count * rate.clamp_min(0) ** self.alpha
        grad = torch.where(valid, torch.sign(weighted - target) * norms, torch.zeros_like(norms))
        b1, b2 = self.betas
        self.adam_steps += valid.long()
        self.adam_m.copy_(torch.where(valid, b1 * self.adam_m + (1 - b1) * grad, self.adam_m))
        self.adam_v.copy_(torch.where(valid, b2 * self.adam_v + (1 - b2) * grad**2, self.adam_v))
        steps = self.adam_steps.clamp_min(1).double()
        m_hat, v_hat = self.adam_m / (1 - b1**steps), self.adam_v / (1 - b2**steps)
        update = torch.where(valid, self.lr * m_hat / (v_hat.sqrt() + 1e-8), torch.zeros_like(m_hat))
        new = (self.weights - update).clamp_min(self.min_weight)
        self.weights.copy_(torch.where(ok, new * (len(self.names) / new.sum()), self.weights))
