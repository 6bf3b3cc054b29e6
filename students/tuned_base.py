"""The part the parameter-efficient students share: a ``lit:`` teacher's frozen pretrained encoders.

Both students (``mwa`` in :mod:`students.mwa`, ``pmf`` in :mod:`students.pmf`) take the LiT
teacher's towers (the ImageNet MobileNetV2 trunk and the MiniLM text encoder), projections and
logit scale, freeze the towers (``requires_grad=False``, kept in eval mode so BatchNorm statistics
never move) and add small trainable modules. Trainable: the new modules, both projections and the
logit scale. ``trainable_share()`` = trainable / all parameters.

:class:`TunedStudent` takes the towers over from a freshly built teacher and provides that
teacher's image transform, tokenisation, preprocessing/tokenizer info and text pooling.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from PIL import Image
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.registry import TEACHERS, create_teacher
from distill.core.towers import pool_text, tokenize_padded
from students.base import Student, TextBatch, check_teacher_option


class TunedStudent(Student):
    """Shared part: the teacher's frozen towers, trainable projections + logit scale."""

    name: str

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """The teacher spec names a registered backend (checked before anything is built)."""
        check_teacher_option(options)

    def __init__(self, teacher: str) -> None:
        super().__init__()
        t = create_teacher(teacher)
        if not isinstance(t, TEACHERS.get("lit")):
            raise ConfigError(f"student {self.name!r} needs a lit: teacher (lit:<folder> or lit:default), "
                             f"got {teacher!r} ({type(t).__name__})")
        self.teacher_spec = teacher
        # The freshly built teacher is discarded, so its modules are taken over rather than copied.
        self.backbone, self.text_model = t.backbone, t.text_model
        self.backbone.requires_grad_(False)
        self.text_model.requires_grad_(False)
        self.image_proj, self.text_proj = t.image_proj.requires_grad_(True), t.text_proj.requires_grad_(True)
        self.logit_scale = nn.Parameter(t.log_logit_scale.detach().clone())
        self.embed_dim, self.image_size = t.embed_dim, t.image_size
        self.image_token_dim, self.text_token_dim = t.image_token_dim, t.text_token_dim
        self._pooling, self._max_length, self._tokenizer = t.cfg.pooling, t.cfg.max_length, t.tokenizer
        self._preprocess, self._tokenizer_info = t.preprocess_info(), t.tokenizer_info()
        self.mean, self.std = tuple(self._preprocess["mean"]), tuple(self._preprocess["std"])
        self._transform = t.image_transform()

    def train(self, mode: bool = True) -> "TunedStudent":
        """Train mode for the new modules; the frozen towers always stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        self.text_model.eval()
        return self

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        return self._transform

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return tokenize_padded(self._tokenizer, texts, self._max_length)

    def preprocess_info(self) -> dict[str, Any]:
        return dict(self._preprocess)

    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self._tokenizer_info)

    def trainable_share(self) -> float:
        """Trainable parameters / all parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / self.num_params()

    def _pool_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return pool_text(hidden, mask, self._pooling)
