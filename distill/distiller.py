"""The trainable unit: student + training stages (each: loss terms + balancer) + the shared embedding
projections and teacher queue.

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

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from distill.balance.base import Balancer
from distill.core.dist import all_gather, gather_with_grad
from distill.core.errors import CheckpointError, ConfigError
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


class Stage(nn.Module):
    """One training stage: its loss terms, the balancer over them and its length in optimizer steps
    (``steps``; ``None`` for the last stage, which runs until the end); ``name`` labels it."""

    def __init__(self, losses: dict[str, DistillLoss], balancer: Balancer, steps: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.balancer = balancer
        self.steps = steps
        self.name = name


class Distiller(nn.Module):
    """``forward(pixels, text, teacher, image_ids, step, total_steps) -> StepOutput``.

    Training runs through ``stages`` in order: stage ``i`` covers the optimizer steps from the end
    of stage ``i - 1`` for ``stages[i].steps`` steps (the last stage: until the end), and a step
    uses only the losses of its stage combined by that stage's balancer (:meth:`stage_at`).

    With ``dims``, ``projections`` (:class:`EmbedProjections`, mode ``projection``) exist when a loss
    of any stage sets ``uses_projection``, and ``queue`` (:class:`TeacherQueue`) when one requests
    ``queue_size > 0`` (its size: the largest request); otherwise they are None."""

    def __init__(self, student: nn.Module, stages: Sequence[Stage], dims: Dims | None = None,
                 projection: str = "auto") -> None:
        super().__init__()
        if not stages:
            raise ConfigError("a distiller needs at least one stage")
        if any(s.steps is None or s.steps < 1 for s in stages[:-1]):
            raise ConfigError("every stage but the last needs a number of steps >= 1")
        self.student = student
        self.stages = nn.ModuleList(stages)
        #: optimizer step at which each stage after the first begins
        self.boundaries = list(accumulate(int(s.steps) for s in stages[:-1]))
        every = [loss for s in stages for loss in s.losses.values()]
        self.projections: EmbedProjections | None = None
        self.queue: TeacherQueue | None = None
        if dims is not None and any(loss.uses_projection for loss in every):
            self.projections = EmbedProjections(dims.student_embed, dims.teacher_embed, projection)
        queue_size = max((int(loss.queue_size) for loss in every), default=0)
        if dims is not None and queue_size > 0:
            self.queue = TeacherQueue(queue_size, dims.teacher_embed)

    def stage_index(self, step: int) -> int:
        """Index into ``stages`` of the stage that trains optimizer step ``step`` (0-based)."""
        return bisect_right(self.boundaries, step)

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.stage_index(step)]

    def stage_label(self, index: int) -> str:
        """``stages[index].name``, or ``stage <index + 1>``."""
        return self.stages[index].name or f"stage {index + 1}"

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
        stage = self.stage_at(step)
        losses = {name: loss(batch).float() for name, loss in stage.losses.items()}
        total, weights = stage.balancer(losses, self.student.shared_parameters())
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
                raise CheckpointError(f"the checkpoint holds distiller {key} but the configured losses use none")


def loss_dims(student: Any, cache: Any) -> Dims:
    """Dimensions of the student (from its attributes) and of the teacher (from the cache manifest)."""
    dims = cache.manifest.get("dims", {})
    img_tok = dims.get("image_tokens") or [0, 0]
    txt_tok = dims.get("text_tokens") or [0, 0]
    return Dims(student_embed=student.embed_dim, teacher_embed=int(dims["embed"]),
                student_image_token=student.image_token_dim, student_text_token=student.text_token_dim,
                teacher_image_token=int(img_tok[-1]), teacher_text_token=int(txt_tok[-1]))


def build_losses(dims: Dims, loss_cfg: Sequence[dict[str, Any]]) -> dict[str, DistillLoss]:
    """Every configured loss term (``[{name, cfg}]``) by name. The Distiller hands every loss the
    batch already gathered over the ranks, so a loss's own ``gather`` is switched off; an explicit
    ``gather`` option is refused rather than overridden."""
    losses = {}
    for item in loss_cfg:
        cfg = item.get("cfg") or {}
        if "gather" in cfg:
            raise ConfigError(f"loss {item['name']!r}: gather is not an option in training: the Distiller hands "
                              "every loss the batch already gathered over the ranks")
        loss = create_loss(item["name"], dims, **cfg)
        if hasattr(loss, "gather"):
            loss.gather = False  # the Distiller already gathered the batch (see above)
        losses[item["name"]] = loss
    return losses


def build_distiller(student: nn.Module, dims: Dims, stages: Sequence[Mapping[str, Any]],
                    projection: str = "auto") -> Distiller:
    """Build every stage (``{losses: [{name, cfg}], balancer: {name, cfg}, steps, name}``: its loss
    terms and the balancer over their names), the shared projections (mode ``projection``) and queue."""
    built = []
    for spec in stages:
        losses = build_losses(dims, spec["losses"])
        balancer = create_balancer(spec["balancer"]["name"], list(losses), **(spec["balancer"].get("cfg") or {}))
        built.append(Stage(losses, balancer, spec.get("steps"), spec.get("name")))
    return Distiller(student, built, dims=dims, projection=projection)
