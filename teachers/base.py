"""The frozen-teacher interface every backend implements."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from distill.core.features import ImageFeatures, TextFeatures

TextBatch = dict[str, Tensor]


@dataclass
class PrunedTowers:
    """Trainable copies of a teacher's first k image blocks and first k text layers.

    ``image(pixels) -> (pooled [B, Ci], tokens [B, N, Ci], grid (h, w) | None)``;
    ``text(batch) -> (pooled [B, Ct], tokens [B, L, Ct], mask [B, L] bool)``. The student adds its
    own projections to a shared embedding space on top. ``config`` is enough to rebuild the same
    towers from the same teacher spec.
    """

    image: nn.Module
    text: nn.Module
    image_dim: int
    text_dim: int
    config: dict[str, Any]


class Teacher(nn.Module, ABC):
    """A frozen image-text model that emits :class:`ImageFeatures` / :class:`TextFeatures`.

    Subclasses set ``spec`` (the string it was built from), ``embed_dim``, ``image_token_dim``,
    ``text_token_dim`` and ``image_size`` and implement the abstract methods. Teachers are always in
    eval mode with ``requires_grad=False`` (call :meth:`freeze` at the end of ``__init__``), except
    trainable heads that a backend explicitly unfreezes (e.g. the LiT projections during
    ``distill.train_lit``).
    """

    spec: str
    embed_dim: int
    image_token_dim: int
    text_token_dim: int
    image_size: int

    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        """The deterministic eval preprocessing: PIL RGB image -> [3, H, W] float tensor."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        """Tokenise captions to a dict of [B, L] tensors (at least ``input_ids``; ``attention_mask``
        when the tokenizer pads)."""

    @abstractmethod
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        """[B, 3, H, W] -> image features; ``layers`` selects intermediate blocks to return
        (pooled), named ``"image.<i>"``."""

    @abstractmethod
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        """Tokenised batch -> text features; intermediates named ``"text.<i>"``."""

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """The teacher's (exp'd) contrastive logit scale, e.g. 100 for CLIP."""

    @abstractmethod
    def preprocess_info(self) -> dict[str, Any]:
        """JSON description of the image preprocessing (size, resize, crop, mean, std)."""

    @abstractmethod
    def tokenizer_info(self) -> dict[str, Any]:
        """JSON description of the tokenizer (name/path, context length, pad id)."""

    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        """Deep-copied first ``image_layers`` / ``text_layers`` blocks (trainable), for layer-pruned
        students. Backends that cannot be pruned raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} does not support layer pruning")

    def config(self) -> dict[str, Any]:
        """JSON config that identifies this teacher (spec + dims + extras); hashed into caches."""
        return {
            "spec": self.spec,
            "embed_dim": self.embed_dim,
            "image_token_dim": self.image_token_dim,
            "text_token_dim": self.text_token_dim,
            "image_size": self.image_size,
            "preprocess": self.preprocess_info(),
            "tokenizer": self.tokenizer_info(),
        }

    def config_hash(self) -> str:
        """sha256 of the config plus a digest of every parameter and buffer, so that two teachers
        with the same spec but different weights never share a cache."""
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":  # teachers never leave eval mode
        return super().train(False)
