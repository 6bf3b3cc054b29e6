"""Helpers shared by the loss modules: fp32 computation, the student's embeddings in the teacher's
space, (multi-positive) InfoNCE, false-negative masks and optional cross-rank gathering."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

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
    s_width, t_width = batch.s_img.embed.shape[-1], batch.teacher.img_embed.shape[-1]
    if s_width != t_width:
        raise ValueError(f"{loss}: the student embedding ({s_width}) and the teacher's ({t_width}) differ in width "
                         "and the batch carries no projected embeddings; build the loss through "
                         "distill.distiller.Distiller (or attach EmbedProjections to the batch)")
    return batch.s_img.embed.float(), batch.s_txt.embed.float()


def multi_positive_nce(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of ``-log sum_{j positive} softmax(logits)_j`` (InfoNCE with several positives;
    with one positive per row it equals the cross-entropy). Excluded columns carry ``-inf``."""
    pos = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)).mean()


def same_image(ids_a: Tensor, ids_b: Tensor) -> Tensor:
    """[len(a), len(b)] bool: True where two rows come from the same image."""
    return ids_a.reshape(-1, 1) == ids_b.reshape(1, -1)


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


def positives_and_mask(logits: Tensor, ids_rows: Tensor, ids_cols: Tensor, offset: int,
                       multi_positive: bool) -> tuple[Tensor, Tensor]:
    """(logits, positives) for an in-batch block whose own pair is column ``offset + i``: with
    ``multi_positive`` every column of the same image is a positive, otherwise the other columns of
    the same image are masked to ``-inf`` (false negatives) and only the own pair is positive."""
    same = same_image(ids_rows, ids_cols)
    own = torch.zeros_like(same)
    rows = torch.arange(logits.shape[0], device=logits.device)
    own[rows, rows + offset] = True
    if multi_positive:
        return logits, same | own
    return logits.masked_fill(same & ~own, float("-inf")), own
