"""The student's own CLIP loss on the ground-truth pairs: symmetric InfoNCE with the student's
learnable scale ``exp(batch.student_logit_scale)`` (clamped to <= 100). Rows of the same image (other
captions of it in the batch) are positives with ``multi_positive`` (default: multi-positive InfoNCE,
``-log sum_{positives} softmax``, so all captions of an image pull on it); with ``multi_positive:
false`` they are masked out of the denominators (false negatives). With ``gather`` (default) each
local anchor is contrasted with the candidates of all ranks. The loss itself is
:func:`distill.core.contrastive.clip_info_nce`, shared with LiT teacher training."""
from __future__ import annotations

from torch import Tensor

from distill.core.contrastive import clip_info_nce
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, gather_pairs

MAX_SCALE = 100.0


@LOSSES.register("student_clip")
class StudentClipLoss(DistillLoss):
    def __init__(self, dims: Dims, gather: bool = True, multi_positive: bool = True) -> None:
        super().__init__()
        self.gather, self.multi_positive = gather, multi_positive

    def forward(self, batch: DistillBatch) -> Tensor:
        with full_precision(batch.s_img.embed):
            scale = batch.student_logit_scale.float().exp().clamp(max=MAX_SCALE)
            img, txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            ids, g = batch.image_ids.to(img.device), gather_pairs(img, txt, batch.image_ids, self.gather)
            return clip_info_nce(img, txt, scale, ids, ids, candidates=(g.img, g.txt, g.ids),
                                 own_offset=None if self.multi_positive else g.offset)
