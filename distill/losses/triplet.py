"""Max-margin triplet loss with hard negatives mined by the teacher.

For each image anchor i the positive is its caption i and the negative is the caption the teacher
scores highest among captions of other images (rows with the same ``image_id`` are never negatives);
the hinge ``max(0, margin - s(i, i) + s(i, neg))`` is applied to the student's cosine similarities.
Text anchors are symmetric (negative = the teacher's hardest image of another image id). The loss is
the mean over all anchors that have a negative (0 if none has). Only the local batch is used."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.core.contrastive import same_image
from distill.losses.common import full_precision


def hinge_on_mined(s_sim: Tensor, t_sim: Tensor, invalid: Tensor, margin: float) -> Tensor:
    """Hinge per anchor row of ``s_sim`` [B, B] (positive on the diagonal) with the negative chosen
    as argmax of ``t_sim`` over columns not marked ``invalid``; rows without a negative are dropped."""
    hardest = t_sim.masked_fill(invalid, float("-inf")).argmax(dim=1)
    has_negative = ~invalid.all(dim=1)
    rows = torch.arange(s_sim.shape[0], device=s_sim.device)
    hinge = (margin - s_sim[rows, rows] + s_sim[rows, hardest]).clamp_min(0)
    return hinge[has_negative]


@LOSSES.register("triplet")
class TripletLoss(DistillLoss):
    def __init__(self, dims: Dims, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            s_img, s_txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            t_img, t_txt = t.image.embed.float(), t.text.embed.float()
            invalid = same_image(batch.image_ids, batch.image_ids).to(s_img.device)
            s_i2t, t_i2t = s_img @ s_txt.T, t_img @ t_txt.T
            hinges = torch.cat([hinge_on_mined(s_i2t, t_i2t, invalid, self.margin),
                                hinge_on_mined(s_i2t.T, t_i2t.T, invalid, self.margin)])
            if hinges.numel() == 0:
                return s_i2t.sum() * 0.0
            return hinges.mean()
