"""The student-to-teacher embedding projections, one per modality, owned by the Distiller and shared
by every loss that compares a student embedding with a teacher embedding (``contrastive_distill``,
``feature_l1``, ``cosine``, ``deep_mse``, ``relation_kl`` with the queue, ...).

Each map is a bias-free linear layer ``student_embed -> teacher_embed`` followed by re-normalisation;
with ``mode="auto"`` (default) it is the identity when the widths match (the student already lives in a
space of the teacher's width; ``train.init_projections`` fits the student's own heads into it), with
``mode="linear"`` it is always a learned map. ``train.init_projections=N`` starts the linear maps by the
least-squares fit student embedding -> teacher embedding (:mod:`distill.pipeline.train.projection_init`).
"""
from __future__ import annotations

from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.losses.base import DistillBatch

MODES = ("auto", "linear")


class EmbedProjection(nn.Module):
    """[B, Ds] student embeddings -> [B, Dt] L2-normalised, float32 (``linear`` None: identity)."""

    def __init__(self, student_dim: int, teacher_dim: int, always_linear: bool = False) -> None:
        super().__init__()
        self.linear: nn.Linear | None = None
        if always_linear or student_dim != teacher_dim:
            self.linear = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.linear is None:
            return x
        return F.normalize(self.linear(x), dim=-1)


class EmbedProjections(nn.Module):
    """``image`` and ``text`` :class:`EmbedProjection`; :meth:`attach` fills a batch's projected fields."""

    def __init__(self, student_dim: int, teacher_dim: int, mode: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"embedding projection mode must be one of {MODES}, got {mode!r}")
        self.image = EmbedProjection(student_dim, teacher_dim, mode == "linear")
        self.text = EmbedProjection(student_dim, teacher_dim, mode == "linear")

    def linear_maps(self) -> dict[str, nn.Linear]:
        """The learned maps by modality (empty when both are the identity)."""
        return {m: p.linear for m, p in (("image", self.image), ("text", self.text)) if p.linear is not None}

    def attach(self, batch: DistillBatch) -> DistillBatch:
        return replace(batch, s_img_proj=self.image(batch.s_img.embed), s_txt_proj=self.text(batch.s_txt.embed))
