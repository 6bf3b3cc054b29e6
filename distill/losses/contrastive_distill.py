"""Contrastive distillation: InfoNCE where the teacher's embedding of the same pair is the positive,
and the other teacher embeddings of the batch plus the shared queue of past teacher embeddings
(:mod:`distill.losses.queue`) are the other columns. The student side is its embedding mapped into
the teacher's space by the Distiller's shared projection (``batch.s_img_proj``/``s_txt_proj``).

Terms (``terms`` config, names ``<student modality>_<teacher modality>``): ``img_img``, ``txt_txt``
(same-modality) and ``img_txt``, ``txt_img`` (cross-modality); the loss is their mean.

``text_target`` picks the teacher text embedding of the ``*_txt`` terms: ``caption`` (the sampled
caption), ``caption_mean`` (``batch.teacher.text_embed_mean``: the normalised mean over all captions of
the image, a less noisy description of the image) or ``both`` (default): the cross-modal ``img_txt``
term targets the caption mean, the same-modality ``txt_txt`` term the sampled caption (the student
embeds that caption, so its own teacher embedding is the exact target). Batches without
``text_embed_mean`` (a teacher run online) use the caption embedding.

Same-image columns: in-batch rows and queue entries that come from the same image as the anchor
(another caption of it, the same image seen in an earlier step / epoch) are positives with
``multi_positive`` (default: multi-positive InfoNCE, ``-log sum_{positives} softmax``); with
``multi_positive: false`` they are excluded from the denominator (false negatives) and only the own
pair is positive. ``queue_size`` (default 8192, 0: no queue) requests the Distiller's shared queue;
the queue holds caption (not caption-mean) embeddings.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from distill.core.errors import ConfigError
from distill.core.contrastive import multi_positive_nce, positives_and_mask, same_image
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, gather_pairs, gather_rows, in_teacher_space

TERMS = ("img_img", "txt_txt", "img_txt", "txt_img")
TEXT_TARGETS = ("caption", "caption_mean", "both")


@LOSSES.register("contrastive_distill")
class ContrastiveDistillLoss(DistillLoss):
    uses_projection = True

    def __init__(self, dims: Dims, queue_size: int = 8192, temperature: float = 0.05,
                 terms: Sequence[str] = TERMS, gather: bool = True, text_target: str = "both",
                 multi_positive: bool = True) -> None:
        super().__init__()
        unknown = [t for t in terms if t not in TERMS]
        if unknown or not terms:
            raise ConfigError(f"contrastive_distill: unknown or empty terms {list(terms)}; choose from {TERMS}")
        if queue_size < 0 or temperature <= 0:
            raise ConfigError("contrastive_distill: queue_size must be >= 0 and temperature > 0")
        if text_target not in TEXT_TARGETS:
            raise ConfigError(f"contrastive_distill: text_target must be one of {TEXT_TARGETS}, got {text_target!r}")
        self.terms = tuple(terms)
        self.temperature = temperature
        self.gather = gather
        self.text_target = text_target
        self.multi_positive = multi_positive
        self.queue_size = queue_size

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            s_img, s_txt = in_teacher_space(batch, "contrastive_distill")
            student = {"img": s_img, "txt": s_txt}
            caption = t.text.embed.detach().float()
            mean = caption if t.text_embed_mean is None else t.text_embed_mean.detach().float()
            t_img, t_cap, all_ids, offset = gather_pairs(t.image.embed.detach().float(), caption, batch.image_ids, self.gather)
            t_mean = gather_rows(mean, self.gather)[0]
            ids = batch.image_ids.to(t_img.device)
            q = batch.queue if self.queue_size else None
            losses = []
            for term in self.terms:
                s_mod, t_mod = term.split("_")
                if t_mod == "img":
                    targets = t_img
                else:
                    use_mean = self.text_target == "caption_mean" or (self.text_target == "both" and s_mod == "img")
                    targets = t_mean if use_mean else t_cap
                queue = None if q is None else (q.img if t_mod == "img" else q.txt, q.ids, q.valid)
                losses.append(self._info_nce(student[s_mod], targets, ids, all_ids, offset, queue))
            return torch.stack(losses).mean()

    def _info_nce(self, anchor: Tensor, targets: Tensor, ids: Tensor, target_ids: Tensor, offset: int,
                  queue: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """Multi-positive InfoNCE of each anchor against [in-batch targets | queue]."""
        logits, positives = positives_and_mask(anchor @ targets.T / self.temperature, ids, target_ids, offset,
                                               self.multi_positive)
        if queue is not None:
            q_emb, q_ids, q_valid = queue
            q_logits = (anchor @ q_emb.T / self.temperature).masked_fill(~q_valid, float("-inf"))
            q_same = same_image(ids, q_ids) & q_valid
            if self.multi_positive:
                q_pos = q_same
            else:
                q_logits, q_pos = q_logits.masked_fill(q_same, float("-inf")), torch.zeros_like(q_same)
            logits, positives = torch.cat([logits, q_logits], dim=1), torch.cat([positives, q_pos], dim=1)
        return multi_positive_nce(logits, positives)
