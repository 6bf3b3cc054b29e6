"""Distillation losses: one file per loss, each class registered with ``@LOSSES.register(name)``
(the registry is declared in :mod:`distill.core.registry`) and built with
``create_loss(name, dims, **cfg)``. Importing this package registers the built-in losses."""
from __future__ import annotations

from distill.core.registry import LOSSES, create_loss
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses import (  # noqa: F401  (registration side effects)
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

__all__ = ["LOSSES", "DistillBatch", "DistillLoss", "Dims", "create_loss"]
