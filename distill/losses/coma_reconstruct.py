"""CoMa-style compression warm-up: the student's token features must be compressible into a few
summary tokens that still carry the teacher's token-level information.

Per modality (image, text):

* encoder: ``num_summary`` (M, default 8) learnable summary tokens cross-attend over the student's
  token features (linearly mapped to ``width``; padded text tokens are never attended);
* decoder: one query per teacher token position (a learned base query plus a learned map of a fixed
  sin/cos encoding of the position: the cell centre on the cached ``image.grid`` for images, the token
  index for text and for image tokens without a grid, e.g. ``topk`` storage) cross-attends over the
  M summary tokens and is mapped to the teacher's token width;
* target: the cached teacher tokens normalised per token (layer norm without affine, as in
  normalised-pixel MAE targets), compared with ``metric`` ``"mse"`` (mean over channels) or
  ``"cosine"`` (``1 - cos``), averaged over the real teacher tokens (text padding excluded).

The term is the mean over the modalities that have both student and teacher tokens (0 when none,
still connected to every parameter so DDP sees them used). Meant as the loss of a first training
stage (``train.warmup_stage``) before the contrastive/distillation stage.
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

METRICS = ("mse", "cosine")
MODALITIES = ("image", "text")
POSITION_BANDS = 8  # sin/cos frequency bands per coordinate


def grid_position_features(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """[h*w, 4*POSITION_BANDS] sin/cos features of the cell centres ``((i+0.5)/h, (j+0.5)/w)`` (row-major)."""
    h, w = grid
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    bands = math.pi * 2.0 ** torch.arange(POSITION_BANDS, device=device, dtype=torch.float32)
    ay, ax = yy.reshape(-1, 1) * bands, xx.reshape(-1, 1) * bands
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def sequence_position_features(n: int, device: torch.device | None = None) -> Tensor:
    """[n, 4*POSITION_BANDS] sin/cos features of token indices 0..n-1 (transformer-style frequencies)."""
    pos = torch.arange(n, device=device, dtype=torch.float32).reshape(-1, 1)
    freqs = 1.0 / 10000.0 ** (torch.arange(2 * POSITION_BANDS, device=device, dtype=torch.float32) / (2 * POSITION_BANDS))
    angles = pos * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def reconstruction_error(pred: Tensor, target: Tensor, mask: Tensor | None = None, metric: str = "mse") -> Tensor:
    """Mean per-token error between ``pred`` [B, N, C] and the per-token layer-normalised ``target``
    [B, N, C] over the tokens where ``mask`` [B, N] is True (all when None)."""
    target = F.layer_norm(target.float(), target.shape[-1:])
    pred = pred.float()
    if metric == "mse":
        per_token = (pred - target).pow(2).mean(dim=-1)
    else:
        per_token = 1 - F.cosine_similarity(pred, target, dim=-1)
    if mask is None:
        return per_token.mean()
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum().clamp_min(1)


class SummaryReconstructor(nn.Module):
    """Student tokens [B, Ns, Cs] -> M summary tokens -> predictions [B, Nt, Ct] at given positions."""

    def __init__(self, student_dim: int, teacher_dim: int, num_summary: int, width: int, heads: int) -> None:
        super().__init__()
        self.inp = nn.Linear(student_dim, width)
        self.summary = nn.Parameter(torch.randn(num_summary, width) * 0.02)
        self.compress = nn.MultiheadAttention(width, heads, batch_first=True)
        self.summary_norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.zeros(width))
        self.position = nn.Linear(4 * POSITION_BANDS, width)
        self.decode = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, teacher_dim)

    def summarise(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """[B, M, width] summary tokens of the real student tokens."""
        x = self.inp(tokens)
        queries = self.summary.unsqueeze(0).expand(x.shape[0], -1, -1)
        attended, _ = self.compress(queries, x, x, key_padding_mask=None if mask is None else ~mask, need_weights=False)
        return self.summary_norm(queries + attended)

    def forward(self, tokens: Tensor, mask: Tensor | None, positions: Tensor) -> Tensor:
        summary = self.summarise(tokens, mask)
        queries = (self.query + self.position(positions)).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        attended, _ = self.decode(queries, summary, summary, need_weights=False)
        return self.out(self.out_norm(queries + attended))


@LOSSES.register("coma_reconstruct")
class ComaReconstructLoss(DistillLoss):
    def __init__(self, dims: Dims, num_summary: int = 8, width: int = 256, heads: int = 4, metric: str = "mse",
                 modalities: tuple[str, ...] | list[str] = MODALITIES) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ConfigError(f"coma_reconstruct: metric must be one of {METRICS}, got {metric!r}")
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ConfigError(f"coma_reconstruct: modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        if num_summary < 1 or width % heads:
            raise ConfigError(f"coma_reconstruct: need num_summary >= 1 and width divisible by heads, "
                             f"got {num_summary}, {width}, {heads}")
        self.metric = metric
        token_dims = {"image": (dims.student_image_token, dims.teacher_image_token),
                      "text": (dims.student_text_token, dims.teacher_text_token)}
        self.reconstructors = nn.ModuleDict({m: SummaryReconstructor(*token_dims[m], num_summary, width, heads)
                                             for m in MODALITIES if m in modalities})

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            terms = []
            if "image" in self.reconstructors and t.image.tokens is not None and batch.s_img.tokens is not None:
                n, device = t.image.tokens.shape[1], t.image.tokens.device
                grid = t.image.grid if t.image.grid is not None and t.image.grid[0] * t.image.grid[1] == n else None
                pos = grid_position_features(grid, device) if grid else sequence_position_features(n, device)
                pred = self.reconstructors["image"](batch.s_img.tokens.float(), None, pos)
                terms.append(reconstruction_error(pred, t.image.tokens, None, self.metric))
            if "text" in self.reconstructors and t.text.tokens is not None and batch.s_txt.tokens is not None:
                s_mask = batch.s_txt.mask.bool() if batch.s_txt.mask is not None else None
                t_mask = t.text.mask.bool() if t.text.mask is not None else None
                pos = sequence_position_features(t.text.tokens.shape[1], t.text.tokens.device)
                pred = self.reconstructors["text"](batch.s_txt.tokens.float(), s_mask, pos)
                terms.append(reconstruction_error(pred, t.text.tokens, t_mask, self.metric))
            keep_in_graph = sum(p.sum() for p in self.parameters()) * 0.0
            if not terms:
                return keep_in_graph
            return torch.stack(terms).mean() + keep_in_graph
