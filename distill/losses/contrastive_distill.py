"""Contrastive distillation: InfoNCE where the teacher's embedding of the same pair is the positive,
and the other teacher embeddings of the batch plus a FIFO queue of past teacher embeddings are the
negatives.

Terms (``terms`` config, names ``<student modality>_<teacher modality>``): ``img_img``, ``txt_txt``
(same-modality) and ``img_txt``, ``txt_img`` (cross-modality); the loss is their mean.

False negatives: in-batch rows and queue entries that come from the same image as the anchor (another
caption of it, or the same image seen again in an earlier step / epoch) are excluded from the
denominator, because the teacher embeds them close to the positive. The queue therefore stores the
image id of every entry next to the embeddings.

The queue (``queue_img``, ``queue_txt``, ``queue_ids``, ``queue_ptr``, ``queue_filled``) consists of
buffers, so it is saved in checkpoints; empty slots are never used as negatives. With ``gather`` (default)
the in-batch candidates and the enqueued rows are the teacher embeddings of all ranks, so every rank
keeps the same queue.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import EmbedProjection, full_precision, gather_pairs, mask_false_negatives

TERMS = ("img_img", "txt_txt", "img_txt", "txt_img")


class ContrastiveDistillLoss(DistillLoss):
    def __init__(self, dims: Dims, queue_size: int = 8192, temperature: float = 0.05,
                 terms: Sequence[str] = TERMS, gather: bool = True) -> None:
        super().__init__()
        unknown = [t for t in terms if t not in TERMS]
        if unknown or not terms:
            raise ValueError(f"contrastive_distill: unknown or empty terms {list(terms)}; choose from {TERMS}")
        if queue_size < 0 or temperature <= 0:
            raise ValueError("contrastive_distill: queue_size must be >= 0 and temperature > 0")
        self.terms = tuple(terms)
        self.temperature = temperature
        self.gather = gather
        self.proj = EmbedProjection(dims.student_embed, dims.teacher_embed)
        self.register_buffer("queue_img", torch.zeros(queue_size, dims.teacher_embed))
        self.register_buffer("queue_txt", torch.zeros(queue_size, dims.teacher_embed))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.img_embed):
            student = {"img": self.proj(batch.s_img.embed), "txt": self.proj(batch.s_txt.embed)}
            t_img, t_txt, all_ids, offset = gather_pairs(t.img_embed.detach().float(), t.txt_embed.detach().float(),
                                                         batch.image_ids, self.gather)
            ids = batch.image_ids.to(t_img.device)
            filled = int(self.queue_filled)
            queue = {"img": self.queue_img[:filled].clone(), "txt": self.queue_txt[:filled].clone()}
            queue_ids = self.queue_ids[:filled].clone()
            teacher = {"img": t_img, "txt": t_txt}
            losses = []
            for term in self.terms:
                s_mod, t_mod = term.split("_")
                losses.append(self._info_nce(student[s_mod], teacher[t_mod], queue[t_mod],
                                             ids, all_ids, queue_ids, offset))
            loss = torch.stack(losses).mean()
        self._enqueue(t_img, t_txt, all_ids)
        return loss

    def _info_nce(self, anchor: Tensor, targets: Tensor, queue: Tensor, ids: Tensor, target_ids: Tensor,
                  queue_ids: Tensor, offset: int) -> Tensor:
        """Cross-entropy of each anchor against [in-batch targets | queue], positive = its own pair."""
        in_batch = mask_false_negatives(anchor @ targets.T / self.temperature, ids, target_ids, offset)
        from_queue = anchor @ queue.T / self.temperature
        from_queue = from_queue.masked_fill(ids.reshape(-1, 1) == queue_ids.reshape(1, -1), float("-inf"))
        logits = torch.cat([in_batch, from_queue], dim=1)
        labels = torch.arange(anchor.shape[0], device=anchor.device) + offset
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def _enqueue(self, img: Tensor, txt: Tensor, ids: Tensor) -> None:
        """Write rows FIFO at ``queue_ptr`` (wrapping around); only the newest ``queue_size`` rows
        are kept when a batch is larger than the queue."""
        size = self.queue_ids.shape[0]
        if size == 0:
            return
        skip = max(0, img.shape[0] - size)
        img, txt, ids = img[skip:], txt[skip:], ids[skip:]
        start = (int(self.queue_ptr) + skip) % size
        idx = (start + torch.arange(img.shape[0], device=img.device)) % size
        self.queue_img[idx] = img.to(self.queue_img.dtype)
        self.queue_txt[idx] = txt.to(self.queue_txt.dtype)
        self.queue_ids[idx] = ids.to(self.queue_ids.device, torch.long)
        self.queue_ptr.fill_((start + img.shape[0]) % size)
        self.queue_filled.fill_(min(int(self.queue_filled) + img.shape[0] + skip, size))


@LOSSES.register("contrastive_distill")
def build(dims: Dims, **cfg) -> ContrastiveDistillLoss:
    return ContrastiveDistillLoss(dims, **cfg)
