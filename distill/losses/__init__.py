"""Loss registry. Every loss is one file registering ``LOSSES.register(name)`` on a factory
``(dims: Dims, **cfg) -> DistillLoss``."""
from __future__ import annotations

from typing import Any

from distill.losses.base import DistillBatch, DistillLoss, Dims, TeacherBatch
from distill.registry import Registry

LOSSES: Registry[DistillLoss] = Registry("loss")


def build_loss(name: str, dims: Dims, **cfg: Any) -> DistillLoss:
    return LOSSES.build(name, dims, **cfg)


from distill.losses import (  # noqa: E402,F401  (registration side effects)
    contrastive_distill,
    feature_l1,
    cosine,
    token,
    relation_kl,
    triplet,
    student_clip,
    mac,
    deep_mse,
    coma_reconstruct,
)

__all__ = ["LOSSES", "DistillBatch", "DistillLoss", "Dims", "TeacherBatch", "build_loss"]
