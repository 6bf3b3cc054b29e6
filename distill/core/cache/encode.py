"""Teacher outputs -> cache arrays: the token storage modes (grid pooling, top-k selection,
symmetric per-token int8 quantisation, the tokens of extra views), the fp16 storage of float
outputs with its checks, and the inverses the reader uses (int8 and bfloat16 decoding).

:func:`image_arrays` / :func:`text_arrays` turn a batch's :class:`ImageFeatures` /
:class:`TextFeatures` into the arrays of :mod:`distill.core.cache.schema` (float outputs still in
float32); :class:`ShardOutputs` collects a shard's batches, checking and casting them for storage:

``--nonfinite error`` (default) refuses a shard with non-finite outputs (NaN/Inf), ``report`` stores
them and records the counts; ``--overflow error`` (default) refuses values that fp16 cannot hold
(``|x| > 65504``), ``fp32``/``bf16`` store that array of that shard in float32 / bfloat16 instead
(bfloat16 as uint16 bit patterns with ``"encoding": "bfloat16"`` in the array record;
:class:`distill.core.cache.reader.TeacherCache` decodes both). Earlier shards on disk are never
touched by a refusal.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from distill.core.cache.schema import (FIELD_SUFFIX, IMAGE, TEXT, VIEW_TOKENS, array_spec, field_array, inter_array,
                                       scale_array, stored_in_fp16)
from distill.core.errors import ConfigError, FP16OverflowError, NonFiniteOutputError
from distill.core.features import ImageFeatures, TextFeatures

Arrays = dict[str, np.ndarray]
FP16_MAX = 65504.0
NONFINITE_MODES = ("error", "report")
OVERFLOW_MODES = ("error", "bf16", "fp32")
DTYPES = ("fp16", "int8")


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
        raise ConfigError(f"token storage {spec!r} must be one of {'|'.join(k + (':<n>' if k in ('grid', 'topk') else '') for k in kinds)}")
    if not sep:
        return TokenMode(kind)
    try:
        k = int(arg)
    except ValueError:
        raise ConfigError(f"token storage {spec!r}: {arg!r} is not an integer") from None
    if k < 1:
        raise ConfigError(f"token storage {spec!r}: the size must be >= 1")
    return TokenMode(kind, k)


def pool_grid(tokens: Tensor, grid: tuple[int, int] | None, g: int) -> Tensor:
    """Adaptive-average-pool [B, h*w, C] tokens laid out on an (h, w) grid to [B, g*g, C]."""
    if grid is None:
        raise ConfigError("grid pooling needs a teacher whose image tokens form a spatial grid (ImageFeatures.grid)")
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
        raise ConfigError(f"top-k of {k} tokens requested but only {tokens.shape[1]} are available")
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


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 numbers stored as their uint16 bit patterns."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


# -- features -> arrays ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStorage:
    """How token features are stored: ``--image-tokens``, ``--text-tokens``, ``--dtype`` (fp16 or
    int8 tokens) and ``--view-tokens`` (image tokens of views >= 1: ``same``, ``none`` or ``grid:<g>``)."""

    image_tokens: TokenMode = TokenMode("full")
    text_tokens: TokenMode = TokenMode("full")
    dtype: str = "fp16"
    view_tokens: str = "same"


def store_tokens(tokens: Tensor, dtype: str, name: str) -> Arrays:
    """Token array ``name`` (float32 for fp16 storage: :class:`ShardOutputs` casts it; int8 with its
    ``_scale`` array)."""
    if dtype == "int8":
        q, scale = quantize_int8(tokens)
        return {name: q.cpu().numpy(), scale_array(name): scale.cpu().numpy().astype(np.float32)}
    return {name: tokens.float().cpu().numpy()}


def feature_arrays(tower: str, f: ImageFeatures | TextFeatures, dtype: str) -> Arrays:
    """One array per stored field of ``f`` (schema names; float outputs in float32, the others in
    their stored dtype) and one per intermediate layer."""
    out: Arrays = {}
    for name in FIELD_SUFFIX:
        value = getattr(f, name, None)
        if value is None:
            continue
        array = field_array(tower, name)
        if name == "tokens":
            out.update(store_tokens(value, dtype, array))
        elif value.is_floating_point():
            out[array] = value.float().cpu().numpy()
        else:
            out[array] = value.cpu().numpy().astype(array_spec(array).stored)
    out.update({inter_array(layer): x.float().cpu().numpy() for layer, x in f.intermediates.items()})
    return out


def stored_image_tokens(f: ImageFeatures, mode: TokenMode) -> ImageFeatures:
    """``f`` with its tokens as stored under ``mode``: all (``full``), pooled to ``grid:<g>``, the
    ``topk:<k>`` of largest norm (with ``token_index``; no grid) or none."""
    if mode.kind == "none":
        return replace(f, tokens=None, grid=None, token_index=None)
    if f.tokens is None:
        raise ConfigError("the teacher returns no image tokens; use --image-tokens none")
    tokens = f.tokens.float()
    if mode.kind == "full":
        return replace(f, tokens=tokens)
    if mode.kind == "grid":
        return replace(f, tokens=pool_grid(tokens, f.grid, mode.k), grid=(mode.k, mode.k))
    kept, index = topk_tokens(tokens, min(mode.k, tokens.shape[1]))
    return replace(f, tokens=kept, grid=None, token_index=index)


def stored_text_tokens(f: TextFeatures, mode: TokenMode) -> TextFeatures:
    """``f`` with its tokens (and mask: all True when the teacher gives none) as stored under
    ``mode``: all, the ``topk:<k>`` real tokens of largest norm (padded to k, with ``token_index``)
    or none."""
    if mode.kind == "none":
        return replace(f, tokens=None, mask=None, token_index=None)
    if f.tokens is None:
        raise ConfigError("the teacher returns no text tokens; use --text-tokens none")
    tokens = f.tokens.float()
    mask = f.mask.bool() if f.mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if mode.kind != "topk":
        return replace(f, tokens=tokens, mask=mask)
    short = max(0, mode.k - tokens.shape[1])
    tokens = F.pad(tokens, (0, 0, 0, short))
    mask = F.pad(mask, (0, short), value=False)
    tokens, index = topk_tokens(tokens, mode.k, mask)
    return replace(f, tokens=tokens, mask=torch.gather(mask, 1, index), token_index=index)


def image_arrays(f: ImageFeatures, views: int, storage: TokenStorage) -> tuple[Arrays, tuple[int, int] | None]:
    """Arrays of the features of n images x ``views`` views (rows image-major) with leading
    [n, V], and the grid of the stored tokens (float outputs in float32; :class:`ShardOutputs`
    checks and casts them for storage)."""
    stored = stored_image_tokens(f, storage.image_tokens)
    n = f.embed.shape[0] // views
    out = {k: a.reshape(n, views, *a.shape[1:]) for k, a in feature_arrays(IMAGE, stored, storage.dtype).items()}
    if views > 1 and storage.view_tokens != "same" and stored.tokens is not None:
        out.update(view_token_arrays(out, f.tokens, f.grid, storage, n, views))
    return out, stored.grid


def view_token_arrays(out: Arrays, tokens: Tensor, grid: tuple[int, int] | None, storage: TokenStorage,
                      n: int, v: int) -> Arrays:
    """``--view-tokens none|grid:<g>``: keep the ``--image-tokens`` arrays of view 0 only (trimming
    ``out`` in place) and, for ``grid:<g>``, add ``image_view_tokens`` [n, V, g*g, C] (all views,
    pooled from the teacher's full token grid; ``_scale`` too when int8)."""
    image_tokens = field_array(IMAGE, "tokens")
    for name in [k for k in out if k.startswith(image_tokens)]:
        out[name] = out[name][:, :1]
    if storage.view_tokens == "none":
        return {}
    g = parse_token_mode(storage.view_tokens).k
    pooled = store_tokens(pool_grid(tokens.float(), grid, g), storage.dtype, VIEW_TOKENS)
    return {k: a.reshape(n, v, *a.shape[1:]) for k, a in pooled.items()}


def text_arrays(f: TextFeatures, storage: TokenStorage) -> Arrays:
    """Arrays of the features of m captions; token arrays are [m, L, ...] with this batch's L."""
    return feature_arrays(TEXT, stored_text_tokens(f, storage.text_tokens), storage.dtype)


def concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, zero-padding axis 1 (caption length) to the longest part."""
    if parts[0].ndim < 2 or len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts])


# -- storage checks ----------------------------------------------------------------------------------
class ShardOutputs:
    """Collects one shard's per-batch teacher outputs (float32), counting and casting each batch
    to its storage type so that only the stored bytes are kept in memory."""

    def __init__(self, shard: str, nonfinite: str = "error", overflow: str = "error") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"--nonfinite must be one of {NONFINITE_MODES}, not {nonfinite!r}")
        if overflow not in OVERFLOW_MODES:
            raise ConfigError(f"--overflow must be one of {OVERFLOW_MODES}, not {overflow!r}")
        self.shard, self.nonfinite, self.overflow = shard, nonfinite, overflow
        self.parts: dict[str, list[np.ndarray]] = {}
        self.counts: dict[str, dict[str, Any]] = {}
        self.wide: dict[str, str] = {}  # array -> "fp32" | "bf16" after an overflow

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            if a.dtype.kind == "f":
                finite = np.isfinite(a)
                c = self.counts.setdefault(name, {"nonfinite": 0, "overflow": 0})
                c["nonfinite"] += int(a.size - np.count_nonzero(finite))
                if stored_in_fp16(name):
                    big = int(np.count_nonzero(np.abs(np.where(finite, a, 0)) > FP16_MAX))
                    c["overflow"] += big
                    if big and self.overflow != "error" and name not in self.wide:
                        self.wide[name] = self.overflow
                        self.parts[name] = [self._cast(name, p.astype(np.float32)) for p in self.parts.get(name, [])]
                    a = self._cast(name, a)
            self.parts.setdefault(name, []).append(a)

    def _cast(self, name: str, a: np.ndarray) -> np.ndarray:
        mode = self.wide.get(name)
        if mode == "fp32":
            return a.astype(np.float32)
        if mode == "bf16":
            return encode_bf16(a)
        with np.errstate(over="ignore"):  # overflow is counted above (refused or reported)
            return a.astype(np.float16)

    def check(self) -> dict[str, Any]:
        """Raise for refused counts; returns the shard's ``output_check`` record (counts per array,
        ``stored_as`` for arrays widened from fp16)."""
        bad = {n: c["nonfinite"] for n, c in self.counts.items() if c["nonfinite"]}
        if bad and self.nonfinite == "error":
            desc = ", ".join(f"{n}: {k}" for n, k in bad.items())
            raise NonFiniteOutputError(f"shard {self.shard}: the teacher produced non-finite values (NaN/Inf) in "
                                       f"{desc}; nothing of this shard was written (completed shards are kept). "
                                       "Fix the teacher/inputs, or pass --nonfinite report to store and count them")
        over = {n: c["overflow"] for n, c in self.counts.items() if c["overflow"]}
        if over and self.overflow == "error":
            desc = ", ".join(f"{n}: {k}" for n, k in over.items())
            raise FP16OverflowError(f"shard {self.shard}: teacher outputs exceed the fp16 range (|x| > {FP16_MAX:g}) in "
                                    f"{desc}; nothing of this shard was written (completed shards are kept). "
                                    "Pass --overflow fp32 or --overflow bf16 to store such arrays wider")
        return {n: {**c, **({"stored_as": self.wide[n]} if n in self.wide else {})} for n, c in sorted(self.counts.items())}

    def encodings(self) -> dict[str, str]:
        """Array name -> record ``encoding`` for arrays stored as bfloat16 bits."""
        return {n: "bfloat16" for n, m in self.wide.items() if m == "bf16"}
