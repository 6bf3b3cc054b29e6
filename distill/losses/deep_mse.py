"""Deep-feature MSE distillation (PUMA style): mean squared error between the (projected,
re-normalised) student embeddings and the teacher's final embeddings, averaged over both modalities.

Optionally the teacher's cached intermediate features (``batch.teacher.intermediates``) are also
targets: ``intermediates={"image.11": 768, "text.6": 512}`` maps each cached feature name to its
width. The student embedding of the matching modality (prefix ``image.`` / ``text.``) is mapped to
that width by a learned bias-free head; head output and teacher feature are both L2-normalised
(intermediate features have arbitrary scales) before the MSE. The intermediate terms are averaged
and added with weight ``intermediate_weight`` (default 1). MSE is the mean over elements."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, in_teacher_space


def _module_key(name: str) -> str:
    return name.replace(".", "__")


@LOSSES.register("deep_mse")
class DeepMSELoss(DistillLoss):
    uses_projection = True

    def __init__(self, dims: Dims, intermediates: dict[str, int] | None = None, intermediate_weight: float = 1.0) -> None:
        super().__init__()
        self.intermediates = dict(intermediates or {})
        bad = [n for n in self.intermediates if not n.startswith(("image.", "text."))]
        if bad:
            raise ConfigError(f"deep_mse: intermediate names must start with 'image.' or 'text.', got {bad}")
        self.heads = nn.ModuleDict({_module_key(n): nn.Linear(dims.student_embed, width, bias=False)
                                    for n, width in self.intermediates.items()})
        self.intermediate_weight = intermediate_weight

    def forward(self, batch: DistillBatch) -> Tensor:
        t = batch.teacher
        with full_precision(t.image.embed):
            s_img, s_txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            p_img, p_txt = in_teacher_space(batch, "deep_mse")
            loss = (F.mse_loss(p_img, t.image.embed.float()) + F.mse_loss(p_txt, t.text.embed.float())) / 2
            if not self.intermediates:
                return loss
            cached = t.intermediates
            terms = []
            for name in self.intermediates:
                if name not in cached:
                    raise KeyError(f"deep_mse: teacher intermediate {name!r} missing from the batch; "
                                   f"available: {sorted(cached)}")
                student = s_img if name.startswith("image.") else s_txt
                pred = F.normalize(self.heads[_module_key(name)](student), dim=-1)
                terms.append(F.mse_loss(pred, F.normalize(cached[name].float(), dim=-1)))
            return loss + self.intermediate_weight * torch.stack(terms).mean()
