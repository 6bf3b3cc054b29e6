"""Training recipes as config layers (dicts merged over a preset by
:meth:`distill.pipeline.train.config.TrainRunConfig.resolve`), shared by the quickstart and the
quality benchmark."""
from __future__ import annotations

from typing import Any


def pruned_student_recipe(teacher: str, image_layers: int | None = None, text_layers: int = 3,
                          trainable_image_blocks: int | None = None, lr: float = 5e-4,
                          init_projections: int = 0) -> dict[str, Any]:
    """The ``pruned`` student of ``teacher`` (a teacher spec): its first ``image_layers`` image
    blocks (default: the deepest cut within half the teacher's image FLOPs) and ``text_layers`` text
    layers, only the last ``trainable_image_blocks`` kept image blocks trained (None: all of them),
    the token embeddings frozen; peak LR ``lr`` and a least-squares start of the projection heads on
    ``init_projections`` samples (0: none)."""
    if image_layers is None:
        from students.pruned import half_compute_layers

        image_layers = half_compute_layers(teacher)
    frozen = 0 if trainable_image_blocks is None else max(0, image_layers - trainable_image_blocks)
    train: dict[str, Any] = {"lr": lr}
    if init_projections:
        train["init_projections"] = init_projections
    return {"student": {"name": "pruned", "teacher": teacher, "image_layers": image_layers,
                        "text_layers": text_layers, "frozen_image_layers": frozen, "freeze_text_embeddings": True},
            "train": train}
