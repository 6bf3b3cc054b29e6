"""Loss balancers: turn a dict of named loss terms into one scalar plus the weights used."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class Balancer(nn.Module):
    """``forward(losses, shared_params) -> (total, weights)``.

    ``losses`` maps term name -> scalar tensor (with grad). ``weights`` maps name -> float actually
    applied this step (logged; ``dynamic`` applies it to the loss divided by its reference). Stateful
    balancers keep their state in buffers / ``state_dict`` so checkpoints resume exactly. ``shared_params`` is only used by gradient-based balancers (GradNorm).
    A non-finite term must never make the weights non-finite.
    """

    def forward(self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter] = ()) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError
