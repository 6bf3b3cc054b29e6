"""Feature containers shared by teachers, students, the cache and the losses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ImageFeatures:
    """Output of an image tower for a batch of B images.

    embed:  [B, D] L2-normalised global embedding (in the shared image-text space).
    tokens: [B, N, C] patch/spatial token features (no CLS), or None.
    grid:   (h, w) with h * w == N when the tokens form a spatial grid, else None.
    intermediates: layer name -> [B, C_l] pooled features of chosen intermediate layers.
    """

    embed: Tensor
    tokens: Tensor | None = None
    grid: tuple[int, int] | None = None
    intermediates: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TextFeatures:
    """Output of a text tower for a batch of B captions.

    embed:  [B, D] L2-normalised global embedding.
    tokens: [B, L, C] per-token features, or None.
    mask:   [B, L] bool, True for real (non-padding) tokens; present whenever tokens is.
    intermediates: layer name -> [B, C_l] pooled features of chosen intermediate layers.
    """

    embed: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None
    intermediates: dict[str, Tensor] = field(default_factory=dict)


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


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise the last dimension, computing in float32 for fp16/bf16 inputs."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=eps).to(x.dtype)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of [B, L, C] honouring a [B, L] bool mask."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
