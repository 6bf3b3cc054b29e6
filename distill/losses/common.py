"""Helpers shared by the loss modules: fp32 computation, the student's embeddings in the teacher's
space and optional cross-rank gathering (the multi-positive InfoNCE pieces and false-negative masks
are in :mod:`distill.core.contrastive`)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

from distill.core.errors import ConfigError
from distill.core.dist import gather_with_grad, is_dist, rank


@contextlib.contextmanager
def full_precision(ref: Tensor) -> Iterator[None]:
    """Disable autocast for ``ref``'s device so that matmuls inside run in float32."""
    with torch.autocast(device_type=ref.device.type, enabled=False):
        yield


def in_teacher_space(batch: Any, loss: str) -> tuple[Tensor, Tensor]:
    """The student's (image, text) embeddings in the teacher's space, float32: the Distiller's shared
    projections (``batch.s_img_proj``/``s_txt_proj``) when present, else the raw embeddings, which is
    only valid when the widths already match (a loss used outside the Distiller)."""
    if batch.s_img_proj is not None and batch.s_txt_proj is not None:
        return batch.s_img_proj.float(), batch.s_txt_proj.float()
    s_width, t_width = batch.s_img.embed.shape[-1], batch.teacher.image.embed.shape[-1]
    if s_width != t_width:
        raise ConfigError(f"{loss}: the student embedding ({s_width}) and the teacher's ({t_width}) differ in width "
                         "and the batch carries no projected embeddings; build the loss through "
                         "distill.distiller.Distiller (or attach EmbedProjections to the batch)")
    return batch.s_img.embed.float(), batch.s_txt.embed.float()


def gather_rows(t: Tensor, enabled: bool) -> tuple[Tensor, int]:
    """Concatenate ``t`` over ranks when ``enabled`` and running distributed; returns the gathered
    tensor and the row offset of this rank's slice in it (0 in a single process). This rank's
    slice keeps its gradient (:func:`distill.core.dist.gather_with_grad`)."""
    if not enabled or not is_dist():
        return t, 0
    return gather_with_grad(t), rank() * t.shape[0]


class Gathered(NamedTuple):
    """Image/text embeddings and image ids of the global batch, and this rank's row offset in it."""
    img: Tensor
    txt: Tensor
    ids: Tensor
    offset: int


def gather_pairs(img: Tensor, txt: Tensor, image_ids: Tensor, enabled: bool) -> Gathered:
    """:func:`gather_rows` applied to paired image/text embeddings and their image ids."""
    all_img, offset = gather_rows(img, enabled)
    all_txt, _ = gather_rows(txt, enabled)
    all_ids, _ = gather_rows(image_ids.to(img.device), enabled)
    return Gathered(all_img, all_txt, all_ids, offset)
