"""The student's own CLIP loss on the ground-truth pairs: symmetric InfoNCE with the student's
learnable scale ``exp(batch.student_logit_scale)`` (clamped to <= 100). Other captions of the same
image are masked out of the denominators (false negatives). With ``gather`` (default) each local
anchor is contrasted with the candidates of all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, gather_pairs, mask_false_negatives

MAX_SCALE = 100.0


class StudentClipLoss(DistillLoss):
    def __init__(self, dims: Dims, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(self, batch: DistillBatch) -> Tensor:
        with full_precision(batch.s_img.embed):
            scale = batch.student_logit_scale.float().exp().clamp(max=MAX_SCALE)
            img, txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            ids, g = batch.image_ids.to(img.device), gather_pairs(img, txt, batch.image_ids, self.gather)
            labels = torch.arange(img.shape[0], device=img.device) + g.offset
            i2t = mask_false_negatives(scale * img @ g.txt.T, ids, g.ids, g.offset)
            t2i = mask_false_negatives(scale * txt @ g.img.T, ids, g.ids, g.offset)
            return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


@LOSSES.register("student_clip")
def build(dims: Dims, **cfg) -> StudentClipLoss:
    return StudentClipLoss(dims, **cfg)
