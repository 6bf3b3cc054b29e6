"""The student interface: a small dual encoder with a learnable logit scale."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from PIL import Image
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures
from distill.core.registry import check_teacher_spec

TextBatch = dict[str, Tensor]


class Student(nn.Module, ABC):
    """A trainable image-level dual encoder.

    ``encode_image``/``encode_text`` return L2-normalised embeddings plus token features
    (``tokens`` at the tower's width, used by the token-level losses). ``config()`` returns the JSON
    from which :func:`students.create_student` rebuilds the same architecture; checkpoints store it.
    """

    name: str
    embed_dim: int
    image_token_dim: int
    text_token_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    logit_scale: nn.Parameter  # log of the scale, CLIP style

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TextBatch: ...

    @abstractmethod
    def encode_image(self, pixels: Tensor) -> ImageFeatures: ...

    @abstractmethod
    def encode_text(self, batch: TextBatch) -> TextFeatures: ...

    @abstractmethod
    def config(self) -> dict[str, Any]: ...

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """Resize + centre crop + normalise (the training view itself is chosen by the data loader)."""
        from torchvision import transforms as T

        return T.Compose([
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def preprocess_info(self) -> dict[str, Any]:
        """JSON description of :meth:`image_transform` (saved next to checkpoints)."""
        return {"size": self.image_size, "resize": "bicubic", "crop": "center",
                "mean": list(self.mean), "std": list(self.std)}

    def tokenizer_info(self) -> dict[str, Any]:
        """JSON description of :meth:`tokenize` (name, context length, pad id)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its tokenizer")

    def projection_heads(self) -> dict[str, tuple[Callable[[Any], Tensor], Tensor]]:
        """``{"image": (features, weight), "text": (...)}`` where ``embed = normalize(features(x) @ weight.T)``
        and ``weight`` [embed_dim, width] can be written in place; used by ``train.init_projections``
        (least-squares start in the teacher's space). Empty when the student has no such final map."""
        return {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters GradNorm measures gradient norms on (default: the last layer of each tower)."""
        return [p for p in self.parameters() if p.requires_grad][-2:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, pixels: Tensor, text: TextBatch) -> tuple[ImageFeatures, TextFeatures]:
        return self.encode_image(pixels), self.encode_text(text)


def check_teacher_option(options: dict[str, Any]) -> None:
    """The ``teacher`` option of a student built from a teacher names a registered backend (a
    :class:`ConfigError` at ``teacher``), checked before anything is built."""
    try:
        check_teacher_spec(options.get("teacher"))
    except ConfigError as e:
        raise type(e)(f"teacher: {e}") from e
