"""The settings of a cache run, validated when built (:class:`~distill.core.errors.ConfigError`
naming the command-line flag): :class:`CacheSettings`, everything besides teacher and dataset that
determines the cache bytes (hashed into the cache's source key), and :class:`CacheJob`, what to
cache where and how to run (teacher, data, output folder, batch size, device, checks).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from distill.core.cache.encode import DTYPES, NONFINITE_MODES, OVERFLOW_MODES, TokenMode, TokenStorage, parse_token_mode
from distill.core.data.pixels import PixelSettings
from distill.core.data.formats.webdataset import samples_per_shard
from distill.core.errors import ConfigError

#: Images per shard unless set (webdataset input: the samples per tar shard, see :meth:`CacheSettings.for_dataset`).
DEFAULT_SHARD_SIZE = 1024
BAD_SAMPLE_MODES = ("error", "skip")


def _check(flag: str, value: Any, kind: type, ok: Callable[[Any], bool], need: str) -> None:
    typed = isinstance(value, kind) and not isinstance(value, bool) if kind is int else \
        isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (typed and ok(value)):
        raise ConfigError(f"{flag} must be {need}, got {value!r}")


def _choice(flag: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides teacher and dataset that determines the cache bytes.

    ``layers``: intermediate layers (``image.<i>`` / ``text.<i>``); ``views`` plain views per image
    (view 0 the clean image), then ``mixup_views`` mixup views; ``view_tokens``: image tokens of
    views >= 1 (``same`` | ``none`` | ``grid:<g>``); ``shard_size`` None: one cache shard per
    webdataset tar shard, else :data:`DEFAULT_SHARD_SIZE` (:meth:`for_dataset`)."""

    image_tokens: TokenMode = TokenMode("full")
    text_tokens: TokenMode = TokenMode("full")
    dtype: str = "fp16"
    layers: tuple[str, ...] = ()
    views: int = 1
    view_seed: int = 0
    view_scale: tuple[float, float] = (0.5, 1.0)
    shard_size: int | None = None
    view_tokens: str = "same"
    mixup_views: int = 0
    mixup_alpha: float = 1.0
    pixels: PixelSettings | None = None

    def __post_init__(self) -> None:
        _check("--views", self.views, int, lambda v: v >= 1, "an integer >= 1")
        if self.shard_size is not None:
            _check("--shard-size", self.shard_size, int, lambda v: v >= 1, "an integer >= 1")
        _check("--mixup-views", self.mixup_views, int, lambda v: v >= 0, "an integer >= 0")
        _check("--mixup-alpha", self.mixup_alpha, float, lambda v: v > 0, "a number > 0")
        _check("--view-seed", self.view_seed, int, lambda v: True, "an integer")
        lo, hi = self.view_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"--view-scale must be min,max with 0 < min <= max <= 1, got '{lo},{hi}'")
        _choice("--dtype", self.dtype, DTYPES)
        if self.text_tokens.kind == "grid":
            raise ConfigError(f"--text-tokens {self.text_tokens} must be one of full|topk:<n>|none")
        parse_layers(self.layers)
        if self.view_tokens not in ("same", "none") and parse_token_mode(self.view_tokens).kind != "grid":
            raise ConfigError(f"--view-tokens {self.view_tokens!r} must be same | none | grid:<g>")

    @property
    def total_views(self) -> int:
        """Cached views per image: ``views`` plain views followed by ``mixup_views`` mixup views."""
        return self.views + self.mixup_views

    @property
    def image_layers(self) -> list[int]:
        return [int(n.split(".")[1]) for n in self.layers if n.startswith("image.")]

    @property
    def text_layers(self) -> list[int]:
        return [int(n.split(".")[1]) for n in self.layers if n.startswith("text.")]

    @property
    def tokens(self) -> TokenStorage:
        """The token storage the encoder applies (:func:`distill.core.cache.encode.image_arrays`)."""
        return TokenStorage(self.image_tokens, self.text_tokens, self.dtype, self.view_tokens)

    @property
    def resolved_shard_size(self) -> int:
        return DEFAULT_SHARD_SIZE if self.shard_size is None else self.shard_size

    def for_dataset(self, ds: Any) -> "CacheSettings":
        """These settings with the shard size fixed for ``ds``: an unset one becomes the samples per
        tar shard of webdataset input (cache shards coincide with tar shards), else the default."""
        if self.shard_size is not None:
            return self
        return replace(self, shard_size=samples_per_shard(ds) or DEFAULT_SHARD_SIZE)

    def storage_json(self) -> dict[str, Any]:
        out = {"image_tokens": str(self.image_tokens), "text_tokens": str(self.text_tokens), "dtype": self.dtype,
               "intermediate_layers": list(self.layers)}
        if self.view_tokens != "same":
            out["view_tokens"] = self.view_tokens
        if self.pixels is not None:
            out["pixels"] = self.pixels.to_json()
        return out

    def views_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.total_views, "seed": self.view_seed, "scale": list(self.view_scale)}
        if self.mixup_views:
            out.update(plain=self.views, mixup=self.mixup_views, mixup_alpha=self.mixup_alpha)
        return out

    def key(self) -> str:
        """sha256 of the settings that determine the bytes (part of every shard's source)."""
        blob = {"storage": self.storage_json(), "views": self.views_json(), "shard_size": self.resolved_shard_size}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheJob:
    """What to cache where, and how: the teacher spec, the dataset (``data``, ``split``,
    ``images_root``, ``on_bad_sample``), the output folder, the teacher batch size, decoding
    workers, device and fp16 autocast (CUDA), ``verify`` (recompute that many random samples and
    compare), ``verify_existing`` (re-hash reused shards), ``overwrite`` (replace another cache),
    ``nonfinite`` / ``overflow`` (see :mod:`distill.core.cache.encode`) and plugin modules."""

    teacher: str
    data: str
    out: Path | str
    split: str | None = None
    images_root: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None
    amp: bool = False
    verify: int = 0
    verify_existing: bool = False
    overwrite: bool = False
    on_bad_sample: str = "error"
    nonfinite: str = "error"
    overflow: str = "error"
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check("--batch-size", self.batch_size, int, lambda v: v >= 1, "an integer >= 1")
        _check("--num-workers", self.num_workers, int, lambda v: v >= 0, "an integer >= 0")
        _check("--verify", self.verify, int, lambda v: v >= 0, "a number of samples >= 0 (0: no check)")
        _choice("--on-bad-sample", self.on_bad_sample, BAD_SAMPLE_MODES)
        _choice("--nonfinite", self.nonfinite, NONFINITE_MODES)
        _choice("--overflow", self.overflow, OVERFLOW_MODES)


def parse_layers(items: Sequence[str]) -> tuple[str, ...]:
    """``--layers image.3,text.2 ...``: the distinct layer names, in order."""
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    for n in names:
        tower, _, i = n.partition(".")
        if tower not in ("image", "text") or not i.isdigit():
            raise ConfigError(f"--layers entry {n!r} must look like image.<i> or text.<i>")
    return tuple(dict.fromkeys(names))


def parse_view_scale(text: str) -> tuple[float, float]:
    """``"min,max"`` crop area fractions with 0 < min <= max <= 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--view-scale must be two numbers min,max, got {text!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"--view-scale must be min,max with 0 < min <= max <= 1, got {text!r}")
    return lo, hi


def resolve_view_tokens(spec: str | None, image_tokens: TokenMode, total_views: int) -> str:
    """``--view-tokens``: ``same`` for a single view or without image tokens (nothing to choose),
    ``grid:2`` by default, else the validated spec."""
    if total_views == 1 or image_tokens.kind == "none":
        return "same"
    if spec is None:
        return "grid:2"
    if spec in ("same", "none"):
        return spec
    mode = parse_token_mode(spec)
    if mode.kind != "grid":
        raise ConfigError(f"--view-tokens {spec!r} must be same | none | grid:<g>")
    return str(mode)
