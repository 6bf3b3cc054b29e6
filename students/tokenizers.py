"""Tokenizers shared by the students (open_clip's offline CLIP BPE tokenizer)."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_PAD_ID = 0


@lru_cache(maxsize=8)
def clip_tokenizer(context_length: int) -> SimpleTokenizer:
    """open_clip's ``SimpleTokenizer`` (vocab 49408, pad id 0, EOT = highest id), cached per length."""
    return SimpleTokenizer(context_length=context_length)


def clip_tokenize(texts: Sequence[str], context_length: int) -> dict[str, torch.Tensor]:
    """``{"input_ids": [B, L] long, "attention_mask": [B, L] long}`` padded/truncated to ``context_length``."""
    ids = clip_tokenizer(context_length)(list(texts))
    return {"input_ids": ids, "attention_mask": (ids != CLIP_PAD_ID).long()}
