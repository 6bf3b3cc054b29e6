"""Relational KL distillation: the student's in-batch similarity distributions should match the
teacher's. For every image row (image->text) and every text row (text->image) the teacher
distribution is ``softmax(t_sim / tau_t)`` and the student's ``softmax(s_sim / tau_s)``; the loss is
``KL(p_t || p_s)`` averaged over rows and directions. ``tau_t`` defaults to ``1 / teacher.logit_scale``
and ``tau_s`` to the same value. With ``intra=True`` image->image and text->text rows (self
similarity excluded) are added. Only the local batch is used (relations need no projection, so
student and teacher widths may differ)."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.losses import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision


def row_kl(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(t) || softmax(s))."""
    log_pt, log_ps = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def off_diagonal(sim: Tensor) -> Tensor:
    """[B, B] -> [B, B-1]: each row without its self-similarity."""
    b = sim.shape[0]
    return sim[~torch.eye(b, dtype=torch.bool, device=sim.device)].reshape(b, b - 1)


class RelationKLLoss(DistillLoss):
    def __init__(self, dims: Dims, tau_t: float | None = None, tau_s: float | None = None, intra: bool = False) -> None:
        super().__init__()
        if (tau_t is not None and tau_t <= 0) or (tau_s is not None and tau_s <= 0):
            raise ValueError("relation_kl: temperatures must be > 0")
        self.tau_t, self.tau_s, self.intra = tau_t, tau_s, intra

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        tau_t = self.tau_t if self.tau_t is not None else 1.0 / t.logit_scale
        tau_s = self.tau_s if self.tau_s is not None else 1.0 / t.logit_scale
        with full_precision(t.img_embed):
            s_img, s_txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            t_img, t_txt = t.img_embed.float(), t.txt_embed.float()
            pairs = [(t_img @ t_txt.T, s_img @ s_txt.T), (t_txt @ t_img.T, s_txt @ s_img.T)]
            if self.intra and s_img.shape[0] > 1:
                pairs += [(off_diagonal(tt @ tt.T), off_diagonal(ss @ ss.T))
                          for tt, ss in ((t_img, s_img), (t_txt, s_txt))]
            return torch.stack([row_kl(tl / tau_t, sl / tau_s) for tl, sl in pairs]).mean()


@LOSSES.register("relation_kl")
def build(dims: Dims, **cfg) -> RelationKLLoss:
    return RelationKLLoss(dims, **cfg)
