"""Least-squares start for a student's projection heads (``train.init_projections: N``).

Before the first step, the student's pooled features of N training samples are regressed (ridge)
onto the cached teacher embeddings of the same samples, and the solution is written into the
student's final linear maps. The student then starts in the teacher's joint space (image and text
aligned through the teacher) instead of from random projections, which matters most for short
budgets and for students built from the teacher's own layers. When the student's embedding is
narrower than the teacher's, the target is the teacher embedding projected on the top principal
directions of the teacher's image and text embeddings. Under DDP the normal equations are averaged
over ranks, so every rank writes the same weights.

The Distiller's shared student->teacher embedding projections (``projections``, when they are learned
maps, :mod:`distill.losses.projection`) are then fitted the same way: the fitted student embeddings of
the same samples regressed onto the teacher embeddings.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from distill.core.dist import all_reduce_mean
from distill.losses.projection import EmbedProjections
from distill.core.data.pixels import student_pixels
from distill.pipeline.train.data import TrainBatch
from students.base import Student
from distill.core.errors import ProjectionInitError


@torch.no_grad()
def init_projections(student: Student, batches: Iterable[TrainBatch], samples: int, device: torch.device,
                     ridge: float = 1e-3, projections: EmbedProjections | None = None) -> dict[str, Any]:
    """Fit the student's projection heads (and the learned maps of ``projections``) on the first
    ``samples`` rows of ``batches`` (per rank); returns the mean cosine between fitted and target
    embeddings per modality, before and after (``projection.<modality>`` for the shared maps)."""
    heads = student.projection_heads()
    if not heads:
        raise ProjectionInitError(f"student {student.name!r} exposes no projection heads; "
                                  "set train.init_projections=0")
    feats: dict[str, list[Tensor]] = {m: [] for m in heads}
    targets: dict[str, list[Tensor]] = {m: [] for m in heads}
    was_training, seen = student.training, 0
    student.eval()
    for batch in batches:
        batch = batch.to(device)
        tokens = batch.text if batch.text is not None else student.tokenize(batch.texts)  # the loader tokenizes
        text = {k: v.to(device) for k, v in tokens.items()}
        inputs = {"image": student_pixels(batch, student, device), "text": text}
        embeds = {"image": batch.teacher.image.embed, "text": batch.teacher.text.embed}
        for m, (features, _) in heads.items():
            feats[m].append(features(inputs[m]).float())
            targets[m].append(embeds[m].float())
        seen += len(batch.texts)
        if seen >= samples:
            break
    student.train(was_training)
    if seen == 0:
        raise ProjectionInitError("train.init_projections: the training data yielded no batch")
    x = {m: torch.cat(v)[:samples] for m, v in feats.items()}
    y = {m: torch.cat(v)[:samples] for m, v in targets.items()}
    basis = _target_basis(torch.cat(list(y.values())), student.embed_dim)
    report: dict[str, Any] = {"samples": min(seen, samples)}
    for m, (_, weight) in heads.items():
        target = y[m] @ basis
        before = _mean_cos(x[m] @ weight.float().T, target)
        solution = _ridge_solve(x[m], target, ridge)  # [width, embed_dim]
        weight.copy_(solution.T.to(weight.dtype))
        report[m] = {"cos_before": before, "cos_after": _mean_cos(x[m] @ solution, target)}
        linear = (projections.linear_maps() if projections is not None else {}).get(m)
        if linear is not None:
            embed = torch.nn.functional.normalize(x[m] @ solution, dim=-1)
            before = _mean_cos(embed @ linear.weight.float().T, y[m])
            fit = _ridge_solve(embed, y[m], ridge)  # [embed_dim, teacher_dim]
            linear.weight.copy_(fit.T.to(linear.weight.dtype))
            report[f"projection.{m}"] = {"cos_before": before, "cos_after": _mean_cos(embed @ fit, y[m])}
    return report


def _ridge_solve(x: Tensor, target: Tensor, ridge: float) -> Tensor:
    """[in, out] ridge least-squares solution of ``x @ W = target`` (normal equations averaged over ranks)."""
    gram = all_reduce_mean(x.T @ x)
    cross = all_reduce_mean(x.T @ target)
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], device=gram.device)
    return torch.linalg.solve(gram + reg, cross)


def _target_basis(teacher: Tensor, dim: int) -> Tensor:
    """[Dt, dim]: the identity when the dims match, else the top ``dim`` principal directions."""
    width = teacher.shape[1]
    if dim == width:
        return torch.eye(width, device=teacher.device)
    if dim > width:
        raise ProjectionInitError(f"train.init_projections: the student embedding ({dim}) is wider than the "
                                  f"teacher's ({width})")
    second_moment = all_reduce_mean(teacher.T @ teacher)
    _, vectors = torch.linalg.eigh(second_moment)
    return vectors[:, -dim:].flip(1)


def _mean_cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
