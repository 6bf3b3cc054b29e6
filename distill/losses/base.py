"""Inputs shared by every distillation loss, and the loss base class."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from distill.features import ImageFeatures, TextFeatures


@dataclass
class TeacherBatch:
    """Cached teacher outputs for the B (image, caption) pairs of a training batch.

    img_embed / txt_embed: [B, Dt] L2-normalised.
    img_tokens: [B, N, Ct] (already dequantised to float) or None; img_grid: (h, w) or None.
    txt_tokens: [B, L, Ct] or None; txt_mask: [B, L] bool or None.
    intermediates: name -> [B, C] pooled intermediate-layer features (e.g. "image.11").
    logit_scale: the teacher's exp'd scale.
    """

    img_embed: Tensor
    txt_embed: Tensor
    img_tokens: Tensor | None = None
    img_grid: tuple[int, int] | None = None
    txt_tokens: Tensor | None = None
    txt_mask: Tensor | None = None
    intermediates: dict[str, Tensor] | None = None
    logit_scale: float = 100.0


@dataclass
class DistillBatch:
    """Everything a loss may look at for one step. Row i of every tensor is the same pair.

    ``image_ids`` [B] lets losses mask false negatives (two captions of one image in a batch).
    ``step``/``total_steps`` drive schedules (e.g. MAC-loss temperature decay).
    ``student_logit_scale`` is the student's LOG-scale parameter (losses apply ``exp`` and clamp).
    """

    s_img: ImageFeatures
    s_txt: TextFeatures
    teacher: TeacherBatch
    student_logit_scale: Tensor
    image_ids: Tensor
    step: int = 0
    total_steps: int = 1


@dataclass
class Dims:
    """Dimensions a loss may need to build learned projections."""

    student_embed: int
    teacher_embed: int
    student_image_token: int
    student_text_token: int
    teacher_image_token: int
    teacher_text_token: int


class DistillLoss(nn.Module):
    """A loss term: ``forward(batch) -> scalar``. May own learned projections and buffers (queues);
    these are trained with the student and saved in checkpoints."""

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
