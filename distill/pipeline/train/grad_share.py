"""Per-term gradient shares (``train.grad_share_every: N``): every N optimizer steps, how much of
the step's gradient each loss term contributes.

For the terms ``L_i`` of the active stage and the balancer's total ``T`` (linear in every ``L_i``
for every built-in balancer), the coefficient of a term is ``c_i = dT/dL_i`` (its weight, divided by
its reference for ``dynamic``) and its gradient ``g_i = c_i * dL_i/dtheta`` over the student's
trainable parameters ``theta``; ``g = sum_i g_i``. Logged per term:

* ``grad_share/<term>`` = ``<g_i, g> / |g|^2``: the signed part of the step's gradient the term
  supplies (the shares add up to 1; a negative share means the term pulls against the others);
* ``grad_norm/<term>`` = ``|g_i|``.

It costs one extra backward pass per term on the measured steps. Not measured under DDP (the
per-term passes would bypass DDP's gradient reduction).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def grad_shares(total: Tensor, losses: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, Tensor]:
    """``{grad_share/<term>, grad_norm/<term>}`` of the terms in ``losses`` (see the module doc);
    the graph is kept for the step's own backward."""
    names = [n for n, v in losses.items() if v.requires_grad]
    if not names or not params:
        return {}
    coefs = torch.autograd.grad(total, [losses[n] for n in names], retain_graph=True, allow_unused=True)
    flat: dict[str, Tensor] = {}
    for name, coef in zip(names, coefs):
        if coef is None:
            continue
        grads = torch.autograd.grad(losses[name] * coef.detach(), params, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                for g, p in zip(grads, params)])
    if not flat:
        return {}
    g = torch.stack(list(flat.values())).sum(0)
    norm2 = (g @ g).clamp_min(1e-30)
    out: dict[str, Tensor] = {}
    for name, gi in flat.items():
        out[f"grad_share/{name}"] = (gi @ g) / norm2
        out[f"grad_norm/{name}"] = gi.norm()
    return out
