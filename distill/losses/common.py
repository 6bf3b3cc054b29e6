"""Helpers shared by the loss modules: fp32 computation, embedding projections, false-negative
masks and optional cross-rank gathering."""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distill.dist import all_gather_cat


@contextlib.contextmanager
def full_precision(ref: Tensor) -> Iterator[None]:
    """Disable autocast for ``ref``'s device so that matmuls inside run in float32."""
    with torch.autocast(device_type=ref.device.type, enabled=False):
        yield


class EmbedProjection(nn.Module):
    """Maps L2-normalised student embeddings [B, Ds] into the teacher space [B, Dt] and
    re-normalises. A learned bias-free linear map when ``Ds != Dt``, the identity otherwise.

    One projection is shared by both modalities so that the student's joint image-text space is
    mapped consistently (cross-modal terms stay meaningful)."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.linear: nn.Linear | None = None
        if student_dim != teacher_dim:
            self.linear = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.linear is None:
            return x
        return F.normalize(self.linear(x), dim=-1)


def same_image(ids_a: Tensor, ids_b: Tensor) -> Tensor:
    """[len(a), len(b)] bool: True where two rows come from the same image."""
    return ids_a.reshape(-1, 1) == ids_b.reshape(1, -1)


def gather_rows(t: Tensor, enabled: bool) -> tuple[Tensor, int]:
    """Concatenate ``t`` over ranks when ``enabled`` and running distributed; returns the gathered
    tensor and the row offset of this rank's slice in it (0 in a single process)."""
    if not enabled or not (dist.is_available() and dist.is_initialized()):
        return t, 0
    return all_gather_cat(t), dist.get_rank() * t.shape[0]


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


def mask_false_negatives(logits: Tensor, ids_rows: Tensor, ids_cols: Tensor, offset: int = 0) -> Tensor:
    """Set logits[i, j] to -inf where column j is another row of the same image as row i; the
    positive column ``offset + i`` is kept."""
    fn = same_image(ids_rows, ids_cols)
    rows = torch.arange(logits.shape[0], device=logits.device)
    fn[rows, rows + offset] = False
    return logits.masked_fill(fn, float("-inf"))
