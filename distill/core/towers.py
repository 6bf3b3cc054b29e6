"""Helpers for encoder towers, shared by the teacher adapters and by the students built on teacher
towers (pruned copies, tuned students): token layouts, text pooling and padded tokenisation."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from distill.core.features import masked_mean


def feature_map_tokens(fmap: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """[B, C, h, w] feature map -> ([B, h*w, C] tokens in row-major order, (h, w))."""
    b, c, h, w = fmap.shape
    return fmap.flatten(2).transpose(1, 2), (h, w)


def pool_text(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Sentence feature: masked mean over tokens (``"mean"``) or the first token (``"cls"``)."""
    return masked_mean(hidden, mask) if pooling == "mean" else hidden[:, 0]


def tokenize_padded(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """A transformers tokenizer's ids and attention mask, padded/truncated to ``max_length``."""
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the trailing columns that are padding in every row (``attention_mask`` all 0), so a batch
    of short captions does not pay for ``max_length`` tokens; masked pooling is unchanged."""
    mask = batch["attention_mask"]
    keep = max(int(mask.sum(dim=1).max().item()) if mask.numel() else 0, 1)
    return {k: v[:, :keep] for k, v in batch.items()}
