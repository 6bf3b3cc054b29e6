"""How the student runs during training, independent of what it computes: SyncBatchNorm under DDP
(``train.sync_bn``), the channels_last memory format (``train.channels_last``) and
``torch.compile`` (``train.compile``).

SyncBatchNorm: under DDP each rank's BatchNorm layers see only the rank's share of the global
batch, so a BatchNorm student (the pruned MobileNetV2) does not train like a single process;
:func:`convert_sync_bn` replaces every *trainable* BatchNorm layer (training mode, trainable affine
parameters) with :class:`torch.nn.SyncBatchNorm`, whose statistics are those of the global batch.
Frozen layers (eval mode, like the frozen prefix of ``pruned`` or the backbone of the tuned
students) keep their class and their fixed statistics. torch's SyncBatchNorm only runs on GPUs
(it raises for CPU tensors under an initialised process group), so ``auto`` converts only under
DDP on CUDA and ``true`` refuses CPU DDP.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distill.core.errors import ConfigError


def _trainable_bn(m: nn.Module) -> bool:
    if not isinstance(m, _BatchNorm) or isinstance(m, nn.SyncBatchNorm) or not m.training:
        return False
    return not m.affine or m.weight.requires_grad


def trainable_batchnorms(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers :func:`convert_sync_bn` would convert."""
    return [name for name, m in module.named_modules() if _trainable_bn(m)]


def convert_sync_bn(module: nn.Module, process_group: Any = None) -> int:
    """Replace the trainable BatchNorm layers below ``module`` (in place) with SyncBatchNorm
    layers sharing their parameters and statistics; returns how many were converted."""
    count = 0
    for name, child in module.named_children():
        if _trainable_bn(child):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
            count += 1
        else:
            count += convert_sync_bn(child, process_group)
    return count


def wants_sync_bn(setting: Any, world_size: int, device: torch.device, student: nn.Module) -> bool:
    """Resolve ``train.sync_bn`` (auto | true | false) for this run."""
    if setting is False or world_size <= 1:
        return False
    if device.type != "cuda":
        if setting is True:
            raise ConfigError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm does not run on CPU "
                              "(use sync_bn auto or false for CPU DDP)")
        return False
    return bool(trainable_batchnorms(student))


def to_channels_last(student: nn.Module) -> nn.Module:
    """The student's 4-D weights (convolutions) in channels_last; the trainer converts the pixels."""
    return student.to(memory_format=torch.channels_last)


def compile_student(student: nn.Module, **options: Any) -> nn.Module:
    """Compile ``encode_image`` and ``encode_text`` (what the distiller calls) with
    :func:`torch.compile`; parameters, buffers and ``state_dict`` keys stay those of the student."""
    for name in ("encode_image", "encode_text"):
        setattr(student, name, torch.compile(getattr(student, name), **options))
    return student
