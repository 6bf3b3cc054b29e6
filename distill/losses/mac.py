"""MAC-loss: a symmetric InfoNCE on the ground-truth pairs whose in-batch negatives are split by
modality. For an image anchor the logits are ``[img . txt_j / tau_inter | img . img_k / tau_intra]``
(j over all captions, the positive being its own caption; k over the other images), and symmetrically
for text anchors. Intra-modality negatives are harder, so their temperature decays linearly from
``tau_intra_start`` (0.03) at step 0 to ``tau_intra_end`` (0.018) at ``decay_until * total_steps``
(0.5) and stays there; ``tau_inter`` is fixed (0.03). Rows of the same image (other captions, the
anchor itself, duplicates) are never negatives. With ``gather`` (default) the candidates come from
all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.losses.common import full_precision, gather_pairs, mask_false_negatives, same_image


class MACLoss(DistillLoss):
    def __init__(self, dims: Dims, tau_intra_start: float = 0.03, tau_intra_end: float = 0.018,
                 decay_until: float = 0.5, tau_inter: float = 0.03, gather: bool = True) -> None:
        super().__init__()
        if min(tau_intra_start, tau_intra_end, tau_inter) <= 0 or not 0 <= decay_until <= 1:
            raise ValueError("mac: temperatures must be > 0 and decay_until in [0, 1]")
        self.tau_intra_start, self.tau_intra_end = tau_intra_start, tau_intra_end
        self.decay_until, self.tau_inter, self.gather = decay_until, tau_inter, gather

    def tau_intra(self, step: int, total_steps: int) -> float:
        """Intra-modality temperature at ``step`` of ``total_steps`` (linear decay, then constant)."""
        end = self.decay_until * max(total_steps, 1)
        frac = 1.0 if end <= 0 else min(max(step / end, 0.0), 1.0)
        return self.tau_intra_start + (self.tau_intra_end - self.tau_intra_start) * frac

    def forward(self, batch: DistillBatch) -> Tensor:
        tau_intra = self.tau_intra(batch.step, batch.total_steps)
        with full_precision(batch.s_img.embed):
            img, txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            ids, g = batch.image_ids.to(img.device), gather_pairs(img, txt, batch.image_ids, self.gather)
            labels = torch.arange(img.shape[0], device=img.device) + g.offset
            same = same_image(ids, g.ids)
            losses = []
            for anchor, same_modality, other_modality in ((img, g.img, g.txt), (txt, g.txt, g.img)):
                inter = mask_false_negatives(anchor @ other_modality.T / self.tau_inter, ids, g.ids, g.offset)
                intra = (anchor @ same_modality.T / tau_intra).masked_fill(same, float("-inf"))
                losses.append(F.cross_entropy(torch.cat([inter, intra], dim=1), labels))
            return (losses[0] + losses[1]) / 2


@LOSSES.register("mac")
def build(dims: Dims, **cfg) -> MACLoss:
    return MACLoss(dims, **cfg)
