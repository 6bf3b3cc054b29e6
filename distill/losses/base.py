"""Inputs shared by every distillation loss, and the loss base class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    txt_embed_mean: [B, Dt] or None: the L2-normalised mean of the teacher embeddings of ALL captions
    of row i's image (the caption-mean text target; None where the batch does not provide it).
    """

    img_embed: Tensor
    txt_embed: Tensor
    img_tokens: Tensor | None = None
    img_grid: tuple[int, int] | None = None
    txt_tokens: Tensor | None = None
    txt_mask: Tensor | None = None
    intermediates: dict[str, Tensor] | None = None
    logit_scale: float = 100.0
    txt_embed_mean: Tensor | None = None


@dataclass
class DistillBatch:
    """Everything a loss may look at for one step. Row i of every tensor is the same pair.

    ``image_ids`` [B] lets losses mask false negatives (two captions of one image in a batch).
    ``step``/``total_steps`` drive schedules (e.g. MAC-loss temperature decay).
    ``student_logit_scale`` is the student's LOG-scale parameter (losses apply ``exp`` and clamp).
    ``s_img_proj`` / ``s_txt_proj``: the student embeddings mapped into the teacher's embedding space
    by the Distiller's shared projections (:class:`distill.losses.projection.EmbedProjections`); None
    when the batch was built without them (losses then need equal widths).
    ``queue``: the Distiller's shared FIFO of past teacher embeddings (:class:`distill.losses.queue.QueueView`)
    or None.
    """

    s_img: ImageFeatures
    s_txt: TextFeatures
    teacher: TeacherBatch
    student_logit_scale: Tensor
    image_ids: Tensor
    step: int = 0
    total_steps: int = 1
    s_img_proj: Tensor | None = None
    s_txt_proj: Tensor | None = None
    queue: Any = None


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
    """A loss term: ``forward(batch) -> scalar``. May own learned parameters and buffers (e.g. token
    projections); these are trained with the student and saved in checkpoints. Embedding projections
    and the teacher queue are shared and owned by the Distiller: a loss sets ``uses_projection`` when
    it reads ``batch.s_img_proj``/``s_txt_proj`` and ``queue_size`` (> 0) to request the shared queue."""

    uses_projection: bool = False
    queue_size: int = 0

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
