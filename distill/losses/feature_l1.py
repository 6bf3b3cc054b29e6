"""L1 distance between the (projected, re-normalised) student embeddings and the teacher
embeddings: mean absolute difference over elements, averaged over the image and text modalities."""
from __future__ import annotations

from torch import Tensor

from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, in_teacher_space


@LOSSES.register("feature_l1")
class FeatureL1Loss(DistillLoss):
    uses_projection = True

    def __init__(self, dims: Dims) -> None:
        super().__init__()

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            s_img, s_txt = in_teacher_space(batch, "feature_l1")
            img = (s_img - t.image.embed.float()).abs().mean()
            txt = (s_txt - t.text.embed.float()).abs().mean()
            return (img + txt) / 2
