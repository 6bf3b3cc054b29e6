"""Inputs shared by every distillation loss, and the loss base class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures


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
    teacher: TeacherTargets
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
