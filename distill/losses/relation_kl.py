"""Relational KL distillation: the student's similarity distributions should match the teacher's.
For every image row (image->text) and every text row (text->image) the teacher distribution is
``softmax(t_sim / tau_t)`` and the student's ``softmax(s_sim / tau_s)``; the loss is ``KL(p_t || p_s)``
averaged over rows and directions.

Temperature: ``temperature`` (default 0.07) is this loss's own, used for teacher and student unless
``tau_t`` / ``tau_s`` are given. ``temperature: null`` restores the old default ``tau = 1 / teacher
logit scale`` (0.01 for CLIP-like teachers: nearly one-hot targets, and a gradient ~1/tau that made the
term dominate every other). With ``tau_squared`` (default) the KL is multiplied by ``tau_s ** 2``
(Hinton et al.'s ``T^2`` factor), so the gradient reaching the student similarities stays
``tau_s * (p_s - p_t)`` instead of ``(p_s - p_t) / tau_s``, bounded as tau gets small.

Columns: the in-batch rows of the other modality, plus, with ``queue`` (default true) and a shared
queue present (:mod:`distill.losses.queue`, e.g. requested by ``contrastive_distill``; ``queue_size``
requests one when relation_kl is used alone), the queued teacher embeddings of the other modality
as extra columns: teacher rows span ``[t_txt | queue_txt]``, student rows ``[s_txt | queue_txt]``
with the student's embeddings mapped into the teacher's space by the Distiller's shared projection
(the queue holds teacher embeddings). Without the queue the student side uses its own embeddings
(relations need no projection). With ``intra=True`` image->image and text->text rows (self
similarity excluded, in-batch only) are added. Only the local (gathered) batch is used.

Old behaviour: ``{temperature: null, tau_squared: false, queue: false}``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill.core.errors import ConfigError
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, in_teacher_space

DEFAULT_QUEUE = 8192


def row_kl(t_logits: Tensor, s_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over rows of KL(softmax(t) || softmax(s)); columns where ``valid`` is False are dropped."""
    if valid is not None:
        t_logits = t_logits.masked_fill(~valid, float("-inf"))
        s_logits = s_logits.masked_fill(~valid, float("-inf"))
    log_pt, log_ps = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    diff = log_pt - log_ps
    if valid is not None:  # -inf - -inf: select, so neither value nor gradient sees the NaN
        diff = torch.where(valid, diff, torch.zeros_like(diff))
    return (log_pt.exp() * diff).sum(-1).mean()


def off_diagonal(sim: Tensor) -> Tensor:
    """[B, B] -> [B, B-1]: each row without its self-similarity."""
    b = sim.shape[0]
    return sim[~torch.eye(b, dtype=torch.bool, device=sim.device)].reshape(b, b - 1)


@LOSSES.register("relation_kl")
class RelationKLLoss(DistillLoss):
    def __init__(self, dims: Dims, temperature: float | None = 0.07, tau_t: float | None = None,
                 tau_s: float | None = None, intra: bool = False, queue: bool = True,
                 queue_size: int = DEFAULT_QUEUE, tau_squared: bool = True) -> None:
        super().__init__()
        if any(v is not None and v <= 0 for v in (temperature, tau_t, tau_s)) or queue_size < 0:
            raise ConfigError("relation_kl: temperatures must be > 0 and queue_size >= 0")
        self.temperature, self.tau_t, self.tau_s, self.intra = temperature, tau_t, tau_s, intra
        self.use_queue, self.tau_squared = bool(queue), tau_squared
        self.queue_size = queue_size if queue else 0
        self.uses_projection = self.use_queue

    def temperatures(self, teacher_logit_scale: float) -> tuple[float, float]:
        """(tau_t, tau_s) in effect."""
        base = self.temperature if self.temperature is not None else 1.0 / teacher_logit_scale
        return (self.tau_t if self.tau_t is not None else base), (self.tau_s if self.tau_s is not None else base)

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        tau_t, tau_s = self.temperatures(t.logit_scale)
        with full_precision(t.image.embed):
            t_img, t_txt = t.image.embed.float(), t.text.embed.float()
            q = batch.queue if self.use_queue else None
            if q is None:
                s_img, s_txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
                pairs = [(t_img @ t_txt.T, s_img @ s_txt.T, None), (t_txt @ t_img.T, s_txt @ s_img.T, None)]
            else:
                s_img, s_txt = in_teacher_space(batch, "relation_kl")
                ones = torch.ones(t_img.shape[0], dtype=torch.bool, device=q.valid.device)
                valid = torch.cat([ones, q.valid]).unsqueeze(0)
                cols_t = {"txt": torch.cat([t_txt, q.txt]), "img": torch.cat([t_img, q.img])}
                cols_s = {"txt": torch.cat([s_txt, q.txt]), "img": torch.cat([s_img, q.img])}
                pairs = [(t_img @ cols_t["txt"].T, s_img @ cols_s["txt"].T, valid),
                         (t_txt @ cols_t["img"].T, s_txt @ cols_s["img"].T, valid)]
            if self.intra and s_img.shape[0] > 1:
                pairs += [(off_diagonal(tt @ tt.T), off_diagonal(ss @ ss.T), None)
                          for tt, ss in ((t_img, s_img), (t_txt, s_txt))]
            kl = torch.stack([row_kl(tl / tau_t, sl / tau_s, v) for tl, sl, v in pairs]).mean()
            return kl * tau_s ** 2 if self.tau_squared else kl
