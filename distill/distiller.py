"""The trainable unit: student + loss terms + the shared embedding projections and teacher queue +
balancer.

The student-to-teacher embedding projections (one per modality, :mod:`distill.losses.projection`) and
the FIFO of past teacher embeddings (:mod:`distill.losses.queue`) are owned here, once, and handed to
every loss through the :class:`DistillBatch` (``s_img_proj``/``s_txt_proj``, ``queue``). The queue is
written by :meth:`Distiller.commit_queues` after the optimizer step (the trainer calls it; a skipped
step calls :meth:`Distiller.discard_pending`).

Wrapping all three in one ``nn.Module`` lets DistributedDataParallel synchronise every learned
parameter. Under DDP the per-rank student features are all-gathered with a gradient-aware gather
(backward sums the gradient over ranks), so every loss sees the global batch exactly as in a
single-process run, every rank computes the same loss value, and DDP's gradient averaging yields
the gradient of that global loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor, nn

from distill.balance.base import Balancer
from distill.core.dist import all_gather, gather_with_grad
from distill.core.features import ImageFeatures, TeacherTargets, TextFeatures
from distill.core.registry import create_balancer, create_loss
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.projection import EmbedProjections
from distill.losses.queue import TeacherQueue


def gather(t: Tensor | None, grad: bool) -> Tensor | None:
    """Concatenate ``t`` from all ranks (identity in a single process); with ``grad`` the gather is
    differentiable and its backward sums the gradient over ranks (every rank computes the same
    global loss)."""
    if t is None:
        return t
    return gather_with_grad(t, sum_grads=True) if grad else all_gather(t)


def gather_image(f: ImageFeatures) -> ImageFeatures:
    return ImageFeatures(gather(f.embed, True), gather(f.tokens, True), f.grid,
                         {k: gather(v, True) for k, v in f.intermediates.items()})


def gather_text(f: TextFeatures) -> TextFeatures:
    return TextFeatures(gather(f.embed, True), gather(f.tokens, True), gather(f.mask, False),
                        {k: gather(v, True) for k, v in f.intermediates.items()})


def gather_teacher(t: TeacherTargets) -> TeacherTargets:
    return t.map(lambda x: gather(x, False))


@dataclass
class StepOutput:
    total: Tensor
    losses: dict[str, Tensor]
    weights: dict[str, float]


class Distiller(nn.Module):
    """``forward(pixels, text, teacher, image_ids, step, total_steps) -> StepOutput``.

    With a warm-up stage, steps ``< warmup_steps`` (stage 1) use only ``warmup_losses`` combined by
    ``warmup_balancer``; later steps (stage 2) use ``losses`` and ``balancer``.

    With ``dims``, ``projections`` (:class:`EmbedProjections`, mode ``projection``) exist when a loss
    of either stage sets ``uses_projection``, and ``queue`` (:class:`TeacherQueue`) when one requests
    ``queue_size > 0`` (its size: the largest request); otherwise they are None."""

    def __init__(self, student: nn.Module, losses: dict[str, DistillLoss], balancer: Balancer,
                 warmup_losses: dict[str, DistillLoss] | None = None, warmup_balancer: Balancer | None = None,
                 warmup_steps: int = 0, dims: Dims | None = None, projection: str = "auto") -> None:
        super().__init__()
        if warmup_steps > 0 and (not warmup_losses or warmup_balancer is None):
            raise ValueError("a warm-up stage needs its losses and balancer")
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.balancer = balancer
        self.warmup_losses = nn.ModuleDict(warmup_losses or {})
        self.warmup_balancer = warmup_balancer
        self.warmup_steps = warmup_steps
        every = [*self.losses.values(), *self.warmup_losses.values()]
        self.projections: EmbedProjections | None = None
        self.queue: TeacherQueue | None = None
        if dims is not None and any(loss.uses_projection for loss in every):
            self.projections = EmbedProjections(dims.student_embed, dims.teacher_embed, projection)
        queue_size = max((int(loss.queue_size) for loss in every), default=0)
        if dims is not None and queue_size > 0:
            self.queue = TeacherQueue(queue_size, dims.teacher_embed)

    def stage(self, step: int) -> int:
        """1 during the warm-up stage, else 2."""
        return 1 if step < self.warmup_steps else 2

    def forward(self, pixels: Tensor, text: dict[str, Tensor], teacher: TeacherTargets, image_ids: Tensor,
                step: int = 0, total_steps: int = 1) -> StepOutput:
        s_img = self.student.encode_image(pixels)
        s_txt = self.student.encode_text(text)
        batch = DistillBatch(s_img=gather_image(s_img), s_txt=gather_text(s_txt), teacher=gather_teacher(teacher),
                             student_logit_scale=self.student.logit_scale, image_ids=gather(image_ids, False),
                             step=step, total_steps=total_steps,
                             queue=self.queue.view() if self.queue is not None else None)
        if self.projections is not None:
            batch = self.projections.attach(batch)
        terms, balancer = (self.warmup_losses, self.warmup_balancer) if self.stage(step) == 1 else (self.losses, self.balancer)
        losses = {name: loss(batch).float() for name, loss in terms.items()}
        total, weights = balancer(losses, self.student.shared_parameters())
        if self.queue is not None and self.training:
            t = batch.teacher
            self.queue.push(t.image.embed, t.text.embed, batch.image_ids)
        return StepOutput(total, losses, weights)

    def commit_queues(self) -> None:
        """Enqueue the teacher rows of the forwards since the last commit (call after the optimizer step)."""
        if self.queue is not None:
            self.queue.commit()

    def discard_pending(self) -> None:
        """Forget the rows of a skipped step."""
        if self.queue is not None:
            self.queue.discard()

    def rollback_buffers(self) -> dict[str, Tensor]:
        """The buffers a forward pass changes (the student's normalisation statistics, balancer
        statistics, loss buffers): what a skipped step must restore. The queue is excluded: it only
        changes in :meth:`commit_queues`."""
        return {name: b for name, b in self.named_buffers() if not name.startswith("queue.")}

    def shared_state_dict(self) -> dict[str, Any]:
        """Checkpoint state of the shared projections and queue (``{}`` for absent ones)."""
        return {"projections": self.projections.state_dict() if self.projections is not None else {},
                "queue": self.queue.state_dict() if self.queue is not None else {}}

    def load_shared_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("projections", "queue"):
            module = getattr(self, key)
            if module is not None:
                module.load_state_dict(state[key])
            elif state[key]:
                raise KeyError(f"the checkpoint holds distiller {key} but the configured losses use none")


def loss_dims(student: Any, cache: Any) -> Dims:
    """Dimensions of the student (from its attributes) and of the teacher (from the cache manifest)."""
    dims = cache.manifest.get("dims", {})
    img_tok = dims.get("image_tokens") or [0, 0]
    txt_tok = dims.get("text_tokens") or [0, 0]
    return Dims(student_embed=student.embed_dim, teacher_embed=int(dims["embed"]),
                student_image_token=student.image_token_dim, student_text_token=student.text_token_dim,
                teacher_image_token=int(img_tok[-1]), teacher_text_token=int(txt_tok[-1]))


def build_losses(dims: Dims, loss_cfg: Sequence[dict[str, Any]]) -> dict[str, DistillLoss]:
    """Every configured loss term (``[{name, cfg}]``) by name."""
    losses = {}
    for item in loss_cfg:
        try:
            loss = create_loss(item["name"], dims, **(item.get("cfg") or {}))
        except TypeError as e:
            raise TypeError(f"loss {item['name']!r}: bad options {item.get('cfg')}: {e}") from e
        if hasattr(loss, "gather"):
            loss.gather = False  # the Distiller already hands every loss the gathered global batch
        losses[item["name"]] = loss
    return losses


def build_distiller(student: nn.Module, dims: Dims, loss_cfg: Sequence[dict[str, Any]], balancer_cfg: dict[str, Any],
                    warmup_stage: dict[str, Any] | None = None, projection: str = "auto") -> Distiller:
    """Build the loss terms and the balancer over their names, plus the optional warm-up stage
    (``{steps, losses, weights}``: its losses under a ``fixed`` balancer), the shared projections
    (mode ``projection``) and queue."""
    losses = build_losses(dims, loss_cfg)
    balancer = create_balancer(balancer_cfg["name"], list(losses), **(balancer_cfg.get("cfg") or {}))
    if not warmup_stage:
        return Distiller(student, losses, balancer, dims=dims, projection=projection)
    warmup_losses = build_losses(dims, warmup_stage["losses"])
    warmup_balancer = create_balancer("fixed", list(warmup_losses), weights=warmup_stage.get("weights") or {})
    return Distiller(student, losses, balancer, warmup_losses, warmup_balancer, int(warmup_stage["steps"]),
                     dims=dims, projection=projection)
