"""Checks of the teacher outputs the cache writer stores: non-finite values (NaN/Inf) and values
that fp16 cannot hold (``|x| > 65504``), counted per array and shard.

``--nonfinite error`` (default) refuses a shard with non-finite outputs, ``report`` stores them and
records the counts; ``--overflow error`` (default) refuses fp16 overflow, ``fp32``/``bf16`` store
that array of that shard in float32 / bfloat16 instead (bfloat16 as uint16 bit patterns with
``"encoding": "bfloat16"`` in the array record; :class:`distill.core.cache.reader.TeacherCache` decodes both).
Earlier shards on disk are never touched by a refusal.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from distill.core.errors import FP16OverflowError, NonFiniteOutputError

FP16_MAX = 65504.0
NONFINITE_MODES = ("error", "report")
OVERFLOW_MODES = ("error", "bf16", "fp32")


def stored_in_fp16(name: str) -> bool:
    """Whether the writer stores this float array in fp16 (embeddings, fp16 tokens, intermediates)."""
    return name in ("image_embed", "text_embed", "image_tokens", "image_view_tokens", "text_tokens") or name.startswith("inter_")


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


class ShardOutputs:
    """Collects one shard's per-batch teacher outputs (float32), counting and casting each batch
    to its storage type so that only the stored bytes are kept in memory."""

    def __init__(self, shard: str, nonfinite: str = "error", overflow: str = "error") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"--nonfinite must be one of {NONFINITE_MODES}, not {nonfinite!r}")
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"--overflow must be one of {OVERFLOW_MODES}, not {overflow!r}")
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
