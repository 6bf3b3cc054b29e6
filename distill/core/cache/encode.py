"""Compact storage of teacher token features in the cache: grid pooling, top-k selection and
symmetric per-token int8 quantisation (plus the inverse used by the reader)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class TokenMode:
    """A parsed ``--image-tokens`` / ``--text-tokens`` value: ``full``, ``grid:<g>``, ``topk:<k>``
    or ``none``; ``k`` is the grid side or the number of kept tokens."""

    kind: str
    k: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("grid", "topk") else self.kind


def parse_token_mode(spec: str, allow_grid: bool = True) -> TokenMode:
    """Parse ``full|grid:<g>|topk:<k>|none`` (grid only for image tokens)."""
    kinds = ("full", "grid", "topk", "none") if allow_grid else ("full", "topk", "none")
    kind, sep, arg = spec.partition(":")
    if kind not in kinds or bool(sep) != (kind in ("grid", "topk")):
        raise ValueError(f"token storage {spec!r} must be one of {'|'.join(k + (':<n>' if k in ('grid', 'topk') else '') for k in kinds)}")
    if not sep:
        return TokenMode(kind)
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"token storage {spec!r}: {arg!r} is not an integer") from None
    if k < 1:
        raise ValueError(f"token storage {spec!r}: the size must be >= 1")
    return TokenMode(kind, k)


def pool_grid(tokens: Tensor, grid: tuple[int, int] | None, g: int) -> Tensor:
    """Adaptive-average-pool [B, h*w, C] tokens laid out on an (h, w) grid to [B, g*g, C]."""
    if grid is None:
        raise ValueError("grid pooling needs a teacher whose image tokens form a spatial grid (ImageFeatures.grid)")
    h, w = grid
    b, n, c = tokens.shape
    if h * w != n:
        raise ValueError(f"token grid {h}x{w} does not match {n} tokens")
    x = tokens.float().reshape(b, h, w, c).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2).contiguous()


def topk_tokens(tokens: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep the ``k`` tokens of largest L2 norm (padding, where ``mask`` is False, ranks last).

    Returns (kept [B, k, C], index [B, k] int64) with indices in ascending (original) order; ties
    are broken by position so the result is deterministic. ``k`` must be <= the token count.
    """
    if k > tokens.shape[1]:
        raise ValueError(f"top-k of {k} tokens requested but only {tokens.shape[1]} are available")
    norms = tokens.float().norm(dim=-1)
    if mask is not None:
        norms = norms.masked_fill(~mask.bool(), -1.0)
    index = torch.argsort(norms, dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
    kept = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return kept, index


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-token absmax quantisation of [..., C]: (int8 values, fp32 scales [...]) with
    ``x ~= q * scale``; all-zero tokens get scale 0."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8` for numpy arrays: float32 ``q * scale[..., None]``."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]
