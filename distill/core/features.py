"""Feature containers shared by teachers, students, the cache and the losses."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """A copy of a features dataclass with ``fn`` applied to every tensor field, every tensor of a
    dict field and, recursively, every tensor of a dataclass field (None and other values kept)."""
    def one(x: Any) -> Any:
        if isinstance(x, Tensor):
            return fn(x)
        if is_dataclass(x) and not isinstance(x, type):
            return _map_tensors(x, fn)
        if isinstance(x, dict):
            return {k: one(v) for k, v in x.items()}
        return x

    return replace(obj, **{f.name: one(getattr(obj, f.name)) for f in fields(obj)})


@dataclass
class ImageFeatures:
    """Output of an image tower for a batch of B images.

    embed:  [B, D] L2-normalised global embedding (in the shared image-text space).
    tokens: [B, N, C] patch/spatial token features (no CLS), or None.
    grid:   (h, w) with h * w == N when the tokens form a spatial grid, else None.
    intermediates: layer name ("image.<i>") -> [B, C_l] pooled features of chosen intermediate layers.
    token_index: [B, N] int64 positions of ``tokens`` in the tower's full token sequence when only
    some were kept (a top-k cache), else None.
    """

    embed: Tensor
    tokens: Tensor | None = None
    grid: tuple[int, int] | None = None
    intermediates: dict[str, Tensor] = field(default_factory=dict)
    token_index: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> "ImageFeatures":
        """A copy with ``fn`` applied to every tensor (intermediates included)."""
        return _map_tensors(self, fn)


@dataclass
class TextFeatures:
    """Output of a text tower for a batch of B captions.

    embed:  [B, D] L2-normalised global embedding.
    tokens: [B, L, C] per-token features, or None.
    mask:   [B, L] bool, True for real (non-padding) tokens; present whenever tokens is.
    intermediates: layer name ("text.<i>") -> [B, C_l] pooled features of chosen intermediate layers.
    token_index: [B, L] int64 positions of ``tokens`` in the full token sequence when only some were
    kept (a top-k cache), else None.
    """

    embed: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None
    intermediates: dict[str, Tensor] = field(default_factory=dict)
    token_index: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> "TextFeatures":
        """A copy with ``fn`` applied to every tensor (intermediates included)."""
        return _map_tensors(self, fn)


@dataclass
class TeacherTargets:
    """The teacher outputs a training step distils from, for the B (image, caption) pairs of a batch:
    the teacher's features of each row's image view (``image``) and caption (``text``), as cached
    (token features already dequantised to float; ``image.grid`` is the cached token grid).

    logit_scale: the teacher's exp'd scale.
    text_embed_mean: [B, Dt] or None: the L2-normalised mean of the teacher embeddings of ALL captions
    of row i's image (the caption-mean text target; None where the batch does not provide it).
    """

    image: ImageFeatures
    text: TextFeatures
    logit_scale: float = 100.0
    text_embed_mean: Tensor | None = None

    @property
    def intermediates(self) -> dict[str, Tensor]:
        """Intermediate-layer features of both towers by layer name (``image.11``, ``text.6``)."""
        return {**self.image.intermediates, **self.text.intermediates}

    def map(self, fn: Callable[[Tensor], Tensor]) -> "TeacherTargets":
        """A copy with ``fn`` applied to every tensor of both towers and the caption-mean target."""
        return _map_tensors(self, fn)


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise the last dimension, computing in float32 for fp16/bf16 inputs."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=eps).to(x.dtype)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of [B, L, C] honouring a [B, L] bool mask."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
