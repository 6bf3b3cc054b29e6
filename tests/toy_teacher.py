"""A tiny deterministic teacher for tests, registered as ``toy:<seed>``.

Importing this module registers it; CLIs load it with ``--plugin tests.toy_teacher``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from teachers import TEACHERS
from teachers.base import Teacher, TextBatch


class ToyTeacher(Teacher):
    """Patch-embedding image tower (32 px, 8 px patches -> 4x4 grid) and a bag-of-bytes text tower."""

    @classmethod
    def from_spec(cls, rest: str) -> "ToyTeacher":
        return cls(seed=int(rest or 0))

    def __init__(self, seed: int = 0, dim: int = 16, context: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_dim, self.image_token_dim, self.text_token_dim, self.image_size = dim, 24, 20, 32
        self.context = context
        self.patch = nn.Conv2d(3, 24, 8, 8)
        self.img_proj = nn.Linear(24, dim)
        self.tok = nn.Embedding(257, 20)
        self.txt_proj = nn.Linear(20, dim)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        return T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = torch.zeros(len(texts), self.context, dtype=torch.long)
        mask = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode()[: self.context]) or [0]
            ids[i, : len(b)] = torch.tensor(b) + 1
            mask[i, : len(b)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        tok = self.patch(pixels).flatten(2).transpose(1, 2)  # [B, 16, 24]
        inter = {f"image.{i}": tok.mean(1) * (i + 1) for i in layers}
        return ImageFeatures(l2_normalize(self.img_proj(tok.mean(1))), tok, (4, 4), inter)

    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        mask = batch["attention_mask"].bool()
        tok = self.tok(batch["input_ids"])
        pooled = masked_mean(tok, mask)
        inter = {f"text.{i}": pooled * (i + 1) for i in layers}
        return TextFeatures(l2_normalize(self.txt_proj(pooled)), tok, mask, inter)

    @property
    def logit_scale(self) -> float:
        return 50.0

    def preprocess_info(self) -> dict[str, Any]:
        return {"size": 32, "resize": "bilinear", "crop": "center", "mean": [0, 0, 0], "std": [1, 1, 1]}

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": "bytes", "context_length": self.context, "pad_id": 0}


TEACHERS.register("toy")(ToyTeacher)
