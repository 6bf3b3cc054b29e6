"""The ``pruned`` student: the teacher's first k image blocks / text layers plus new projections.

``create_student("pruned", teacher="openclip:ViT-B-32:...", image_layers=6, text_layers=6, embed_dim=256)``
copies the towers with :meth:`teachers.base.Teacher.pruned_towers` and keeps the teacher's
tokenizer and image transform. ``frozen_image_layers=f`` keeps the first f kept image blocks (and
the stem) frozen, in eval mode: on CPU this cuts the step time of a CNN tower several-fold, since
the high-resolution early blocks dominate the backward pass. ``freeze_text_embeddings=True`` freezes
the text tower's embedding tables (a 30K-word table is most of a small text tower's parameters and
of the optimizer's work, while a few thousand captions touch few rows). Rebuilding (e.g. :func:`students.load_student`) needs the same
teacher spec to be buildable again.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize
from distill.core.profile import count_flops
from distill.core.errors import ConfigError
from distill.core.registry import STUDENTS, create_teacher
from students.base import Student, TextBatch, check_teacher_option


@STUDENTS.register("pruned")
class PrunedStudent(Student):
    """Layer-pruned copy of a teacher with linear projections to ``embed_dim`` and a logit scale."""

    name = "pruned"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """The teacher spec names a registered backend (checked before anything is built)."""
        check_teacher_option(options)

    def __init__(self, teacher: str, image_layers: int, text_layers: int, embed_dim: int = 256,
                 frozen_image_layers: int = 0, freeze_text_embeddings: bool = False) -> None:
        super().__init__()
        t = create_teacher(teacher)
        towers = t.pruned_towers(image_layers, text_layers)
        _check_copied(t, towers.image, towers.text)
        self.teacher_spec, self.image_layers, self.text_layers = teacher, image_layers, text_layers
        self.embed_dim = embed_dim
        self.image_token_dim, self.text_token_dim = towers.image_dim, towers.text_dim
        self.image_size = t.image_size
        self.image_tower, self.text_tower = towers.image, towers.text
        for p in [*self.image_tower.parameters(), *self.text_tower.parameters()]:
            p.requires_grad_(True)  # copies of a frozen teacher come frozen
        self.frozen_image_layers = frozen_image_layers
        self._frozen = _freeze_prefix(self.image_tower, frozen_image_layers, image_layers)
        self.freeze_text_embeddings = freeze_text_embeddings
        if freeze_text_embeddings:
            for m in self.text_tower.modules():
                if isinstance(m, nn.Embedding):
                    m.requires_grad_(False)
        self.image_proj = nn.Linear(towers.image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(towers.text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._preprocess = t.preprocess_info()
        self._tokenizer_info = t.tokenizer_info()
        self.mean = tuple(self._preprocess.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(self._preprocess.get("std", (1.0, 1.0, 1.0)))
        self._transform = t.image_transform()
        # Keep only the teacher's tokenizer: its weights are no longer needed (the towers are copies).
        self._tokenize = t.to("meta").tokenize

    def train(self, mode: bool = True) -> "PrunedStudent":
        """Frozen prefix blocks stay in eval mode (their normalisation statistics are frozen too)."""
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        return self._transform

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return self._tokenize(texts)

    def preprocess_info(self) -> dict[str, Any]:
        return dict(self._preprocess)

    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self._tokenizer_info)

    def encode_image(self, pixels: Tensor) -> ImageFeatures:
        pooled, tokens, grid = self.image_tower(pixels)
        return ImageFeatures(embed=l2_normalize(self.image_proj(pooled)), tokens=tokens, grid=grid)

    def encode_text(self, batch: TextBatch) -> TextFeatures:
        pooled, tokens, mask = self.text_tower(batch)
        return TextFeatures(embed=l2_normalize(self.text_proj(pooled)), tokens=tokens, mask=mask)

    def projection_heads(self) -> dict[str, tuple[Callable[[Any], Tensor], Tensor]]:
        return {"image": (lambda pixels: self.image_tower(pixels)[0], self.image_proj.weight),
                "text": (lambda batch: self.text_tower(batch)[0], self.text_proj.weight)}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher_spec, "image_layers": self.image_layers,
                "text_layers": self.text_layers, "embed_dim": self.embed_dim,
                "frozen_image_layers": self.frozen_image_layers, "freeze_text_embeddings": self.freeze_text_embeddings}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last matrix weight of each pruned tower (shared by embedding and token losses)."""
        return [_last_matrix(self.image_tower, "image"), _last_matrix(self.text_tower, "text")]


def _freeze_prefix(tower: nn.Module, n: int, depth: int) -> list[nn.Module]:
    """Freeze the stem and first ``n`` blocks of ``tower``; returns the frozen modules."""
    if n == 0:
        return []
    if not 0 < n <= depth:
        raise ConfigError(f"frozen_image_layers must be in [0, image_layers={depth}], got {n}")
    if not hasattr(tower, "prefix_modules"):
        raise ConfigError(f"{type(tower).__name__} does not support frozen_image_layers")
    modules = tower.prefix_modules(n)
    for m in modules:
        m.requires_grad_(False).eval()
    for p in getattr(tower, "prefix_parameters", list)():
        p.requires_grad_(False)
    return modules


def _check_copied(teacher: Any, *towers: nn.Module) -> None:
    """The teacher is dropped after pruning, so its towers must not share its weights."""
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for tower in towers:
        if any(p.untyped_storage().data_ptr() in teacher_storage for p in tower.parameters()):
            raise ValueError(f"{type(teacher).__name__}.pruned_towers() returned modules that share the "
                             "teacher's weights; it must return deep copies")


def _last_matrix(module: nn.Module, what: str) -> nn.Parameter:
    weights = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    if not weights:
        raise ConfigError(f"the pruned {what} tower has no trainable weight matrix")
    return weights[-1]


def half_compute_layers(teacher: Any, fraction: float = 0.5) -> int:
    """The deepest number of image blocks k whose pruned tower costs at most ``fraction`` of the
    teacher's full image encoder (FLOPs on one image; 1 if even one block costs more). Block costs
    differ (a CNN's early high-resolution blocks cost most), so every depth is measured, from 1 up,
    until the budget is passed."""
    t = create_teacher(teacher) if isinstance(teacher, str) else teacher
    pixels = torch.zeros(1, 3, t.image_size, t.image_size, device=next(t.parameters()).device)
    budget = fraction * count_flops(lambda x: t.encode_image(x), pixels)
    k = 1
    while True:
        try:
            cost = count_flops(t.pruned_towers(k + 1, 1).image, pixels)
        except ValueError:  # deeper than the teacher
            return k
        if cost > budget:
            return k
        k += 1
