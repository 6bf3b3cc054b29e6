"""Token-level distillation: student token features are projected to the teacher's token width
(a learned bias-free linear map per modality, always present because even equal widths do not
share a basis) and compared per token with ``1 - cosine``. Cosine is used instead of smooth-L1
because teacher token norms vary widely between models and layers (a few high-norm "register"
tokens would dominate an L1/L2 distance); the direction carries the feature content.

Matching student tokens to teacher tokens:

* image, both sides on a spatial grid (``batch.teacher.image.grid`` and ``batch.s_img.grid``): the
  student token map is adaptive-average-pooled to the teacher grid and compared cell by cell;
* image otherwise (token counts differ without grids, or teacher tokens stored as top-k indexed
  tokens, which have no grid) and text from different tokenisers: attention matching, where each
  teacher token attends over the real student tokens with ``softmax(q k^T / sqrt(C))`` (q = teacher
  token, k = v = projected student tokens) and the attended feature is compared with the teacher token;
* text with the same tokeniser (``text_match="position"``, or ``"auto"`` when the tokenisers agree):
  token by token. Student and teacher may pad to different lengths (context lengths differ): both are
  trimmed to the shorter length, which is allowed when the longer side has only padding beyond it, and
  the tokenisers agree when the masks are equal on that overlap. ``"auto"`` falls back to attention
  matching only when they do not agree (or a side has no mask and the lengths differ);
  ``"position"`` raises then.

Padding (``mask`` False) never contributes: padded features are zeroed before use, padded student
tokens get no attention, and padded teacher tokens are excluded from the mean.

When the teacher (or student) provides no tokens for a modality that term is skipped; with no term
left the loss is 0. The result always stays connected to the projection weights (times zero) so
that DDP sees every parameter used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision
from distill.losses.pooling import adaptive_avg_pool2d

TEXT_MATCH = ("auto", "position", "attention")


def _zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of [B, N] ``values`` over the True entries of ``mask``."""
    if mask is None:
        return values.mean()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def attention_match(student: Tensor, s_mask: Tensor | None, teacher: Tensor, t_mask: Tensor | None) -> Tensor:
    """Mean ``1 - cos`` between each real teacher token [B, Nt, C] and its attention-weighted
    average over the real student tokens [B, Ns, C]."""
    student, teacher = _zero_padding(student, s_mask), _zero_padding(teacher, t_mask)
    scores = teacher @ student.transpose(1, 2) / math.sqrt(teacher.shape[-1])
    if s_mask is not None:
        scores = scores.masked_fill(~s_mask.unsqueeze(1), torch.finfo(scores.dtype).min)
    attended = scores.softmax(dim=-1) @ student
    return _masked_mean(1 - F.cosine_similarity(attended, teacher, dim=-1), t_mask)


@LOSSES.register("token")
class TokenLoss(DistillLoss):
    def __init__(self, dims: Dims, text_match: str = "auto") -> None:
        super().__init__()
        if text_match not in TEXT_MATCH:
            raise ConfigError(f"token: text_match must be one of {TEXT_MATCH}, got {text_match!r}")
        self.text_match = text_match
        self.img_proj = nn.Linear(dims.student_image_token, dims.teacher_image_token, bias=False)
        self.txt_proj = nn.Linear(dims.student_text_token, dims.teacher_text_token, bias=False)

    def forward(self, batch: DistillBatch) -> Tensor:
        t, s_img, s_txt = batch.teacher, batch.s_img, batch.s_txt
        with full_precision(t.image.embed):
            terms = []
            if t.image.tokens is not None and s_img.tokens is not None:
                terms.append(self.image_term(s_img.tokens, s_img.grid, t.image.tokens, t.image.grid))
            if t.text.tokens is not None and s_txt.tokens is not None:
                terms.append(self.text_term(s_txt.tokens, s_txt.mask, t.text.tokens, t.text.mask))
            keep_in_graph = sum(p.sum() for p in self.parameters()) * 0.0
            if not terms:
                return keep_in_graph
            return torch.stack(terms).mean() + keep_in_graph

    def image_term(self, s_tokens: Tensor, s_grid: tuple[int, int] | None, t_tokens: Tensor,
                   t_grid: tuple[int, int] | None) -> Tensor:
        s_tokens, t_tokens = s_tokens.float(), t_tokens.float()
        if s_grid is None or t_grid is None:
            return attention_match(self.img_proj(s_tokens), None, t_tokens, None)
        b, n, c = s_tokens.shape
        if s_grid[0] * s_grid[1] != n or t_grid[0] * t_grid[1] != t_tokens.shape[1]:
            raise ConfigError(f"token: grids {s_grid} (student) / {t_grid} (teacher) do not match token "
                             f"counts {n} / {t_tokens.shape[1]}")
        grid = s_tokens.transpose(1, 2).reshape(b, c, *s_grid)
        pooled = adaptive_avg_pool2d(grid, t_grid).flatten(2).transpose(1, 2)
        return (1 - F.cosine_similarity(self.img_proj(pooled), t_tokens, dim=-1)).mean()

    def text_term(self, s_tokens: Tensor, s_mask: Tensor | None, t_tokens: Tensor, t_mask: Tensor | None) -> Tensor:
        student, teacher = self.txt_proj(_zero_padding(s_tokens.float(), s_mask)), t_tokens.float()
        s_mask = s_mask.bool() if s_mask is not None else None
        t_mask = t_mask.bool() if t_mask is not None else None
        aligned = self._aligned(student, s_mask, teacher, t_mask)
        if aligned is not None:
            student, s_mask, teacher, t_mask = aligned
            both = s_mask if t_mask is None else (t_mask if s_mask is None else s_mask & t_mask)
            student, teacher = _zero_padding(student, both), _zero_padding(teacher, both)
            return _masked_mean(1 - F.cosine_similarity(student, teacher, dim=-1), both)
        return attention_match(student, s_mask, teacher, t_mask)

    def _aligned(self, student: Tensor, s_mask: Tensor | None, teacher: Tensor,
                 t_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None] | None:
        """Student/teacher tokens and masks trimmed to a common length when they can be matched by
        position, else None (attention matching)."""
        if self.text_match == "attention":
            return None
        ls, lt = student.shape[1], teacher.shape[1]
        n = min(ls, lt)
        reason = None
        if ls != lt and (s_mask is None or t_mask is None):
            reason = f"lengths differ (student {ls} vs teacher {lt}) and a side has no mask"
        elif (s_mask is not None and s_mask[:, n:].any()) or (t_mask is not None and t_mask[:, n:].any()):
            reason = f"real tokens beyond the common length {n} (student {ls} vs teacher {lt})"
        elif s_mask is not None and t_mask is not None and not torch.equal(s_mask[:, :n], t_mask[:, :n]):
            reason = "the masks differ (another tokeniser)"
        if reason is None:
            trim = lambda m: None if m is None else m[:, :n]  # noqa: E731
            return student[:, :n], trim(s_mask), teacher[:, :n], trim(t_mask)
        if self.text_match == "position":
            raise ConfigError(f"token: text_match='position' but the text tokens cannot be matched by position: {reason}")
        return None
