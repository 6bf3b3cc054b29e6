"""Cosine distillation: ``1 - (mean cos + 1) / 2`` where the mean runs over the cosine similarities
between each (projected) student embedding and the teacher embedding of the same row, for both
modalities. The value lies in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, in_teacher_space


@LOSSES.register("cosine")
class CosineLoss(DistillLoss):
    uses_projection = True

    def __init__(self, dims: Dims) -> None:
        super().__init__()

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            s_img, s_txt = in_teacher_space(batch, "cosine")
            cos = torch.cat([F.cosine_similarity(s_img, t.image.embed.float(), dim=-1),
                             F.cosine_similarity(s_txt, t.text.embed.float(), dim=-1)])
            return 1 - (cos.mean() + 1) / 2
