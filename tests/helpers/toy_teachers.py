"""Toy teachers for tests, registered on import; CLIs load them with ``--plugin tests.helpers.toy_teachers``.

    toy:<seed>               a patch-embedding image tower (32 px, 8 px patches -> 4x4 grid) and a
                             bag-of-bytes text tower
    slowtoy:<seed>           the toy teacher sleeping 0.25 s per image batch (so a cache run can be killed part-way)
    widetoy:<seed>           a toy with other preprocessing (48 px, mean/std 0.5, 8-dim embeddings)
    prunetoy:<seed>[:shared] the toy teacher plus residual MLP blocks, so it can be layer-pruned
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from teachers import TEACHERS
from teachers.base import PrunedTowers, Teacher, TextBatch


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


class SlowToyTeacher(ToyTeacher):
    """The toy teacher, sleeping 0.25 s per image batch."""

    def encode_image(self, pixels, layers=()):
        time.sleep(0.25)
        return super().encode_image(pixels, layers)


class WideToy(ToyTeacher):
    """A toy member with other preprocessing: 48 px, normalised with mean/std 0.5, 8-dim embeddings."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed, dim=8)
        self.image_size = 48

    def image_transform(self):
        return T.Compose([T.Resize(48), T.CenterCrop(48), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def encode_image(self, pixels, layers=()):
        return super().encode_image(F.interpolate(pixels, size=(32, 32), mode="nearest"), layers)  # toy: 4x4 grid

    def preprocess_info(self):
        return {"size": 48, "resize": "bilinear", "crop": "center", "mean": [0.5] * 3, "std": [0.5] * 3}


class _ImageTower(nn.Module):
    def __init__(self, patch: nn.Conv2d, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.patch, self.blocks = patch, nn.ModuleList(blocks)

    def forward(self, pixels: torch.Tensor):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = x + b(x)
        return x.mean(1), x, (4, 4)


class _TextTower(nn.Module):
    def __init__(self, tok: nn.Embedding, layers: list[nn.Module]) -> None:
        super().__init__()
        self.tok, self.layers = tok, nn.ModuleList(layers)

    def forward(self, batch):
        mask = batch["attention_mask"].bool()
        x = self.tok(batch["input_ids"])
        for layer in self.layers:
            x = x + layer(x)
        return masked_mean(x, mask), x, mask


class PrunableToyTeacher(ToyTeacher):
    """The toy teacher plus residual MLP blocks, so it can be layer-pruned."""

    @classmethod
    def from_spec(cls, rest: str) -> "PrunableToyTeacher":
        return cls(int(rest.split(":")[0] or 0), share=rest.endswith(":shared"))

    def __init__(self, seed: int, depth: int = 10, share: bool = False) -> None:
        super().__init__(seed)
        self.share = share
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24))
                                    for _ in range(depth))
        self.text_layers = nn.ModuleList(nn.Linear(20, 20) for _ in range(depth))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in [*self.blocks.parameters(), *self.text_layers.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def encode_image(self, pixels, layers=()):
        f = super().encode_image(pixels)
        _, tokens, _ = _ImageTower(self.patch, list(self.blocks))(pixels)
        f.embed, f.tokens = nn.functional.normalize(self.img_proj(tokens.mean(1)), dim=-1), tokens
        return f

    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        cp = (lambda m: m) if self.share else copy.deepcopy
        image = _ImageTower(cp(self.patch), [cp(b) for b in self.blocks[:image_layers]])
        text = _TextTower(cp(self.tok), [cp(x) for x in self.text_layers[:text_layers]])
        return PrunedTowers(image, text, 24, 20, {"image_layers": image_layers, "text_layers": text_layers})


TEACHERS.register("toy")(ToyTeacher)
TEACHERS.register("slowtoy")(SlowToyTeacher)
TEACHERS.register("widetoy")(WideToy)
TEACHERS.register("prunetoy")(PrunableToyTeacher)
