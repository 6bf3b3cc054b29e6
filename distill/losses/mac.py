"""MAC-loss (PUMA): a symmetric InfoNCE on the ground-truth pairs whose in-batch negatives are split
by modality into two temperature groups. For an image anchor i the logits are

``[img_i . txt_i / tau_intra | img_i . txt_j / tau_inter (j != i) | img_i . img_k / tau_intra (k != i)]``

with the positive (label 0) in the hard, intra-modality group's temperature, and symmetrically for
text anchors. The intra temperature decays exponentially,
``tau_intra(t) = start * (end / start) ** min(1, t / (decay_until * total_steps))``, from
``tau_intra_start`` (0.03) to ``tau_intra_end`` (0.018) at ``decay_until`` (0.5) of training, then stays
there (``schedule: linear`` gives the straight-line decay instead); ``tau_inter`` is fixed (0.03). Rows
of the same image (other captions, the anchor itself, duplicates) are never negatives. With
``gather`` (default) the candidates come from all ranks."""
from __future__ import annotations

import torch
from torch import Tensor

from distill.core.errors import ConfigError
from distill.core.registry import LOSSES
from distill.losses.base import DistillBatch, DistillLoss, Dims
from distill.core.contrastive import same_image
from distill.losses.common import full_precision, gather_pairs

SCHEDULES = ("exponential", "linear")


@LOSSES.register("mac")
class MACLoss(DistillLoss):
    def __init__(self, dims: Dims, tau_intra_start: float = 0.03, tau_intra_end: float = 0.018,
                 decay_until: float = 0.5, tau_inter: float = 0.03, gather: bool = True,
                 schedule: str = "exponential") -> None:
        super().__init__()
        if min(tau_intra_start, tau_intra_end, tau_inter) <= 0 or not 0 <= decay_until <= 1:
            raise ConfigError("mac: temperatures must be > 0 and decay_until in [0, 1]")
        if schedule not in SCHEDULES:
            raise ConfigError(f"mac: schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.tau_intra_start, self.tau_intra_end = tau_intra_start, tau_intra_end
        self.decay_until, self.tau_inter, self.gather, self.schedule = decay_until, tau_inter, gather, schedule

    def tau_intra(self, step: int, total_steps: int) -> float:
        """Intra-modality temperature at ``step`` of ``total_steps`` (decay, then constant)."""
        end = self.decay_until * max(total_steps, 1)
        frac = 1.0 if end <= 0 else min(max(step / end, 0.0), 1.0)
        if self.schedule == "linear":
            return self.tau_intra_start + (self.tau_intra_end - self.tau_intra_start) * frac
        return self.tau_intra_start * (self.tau_intra_end / self.tau_intra_start) ** frac

    def forward(self, batch: DistillBatch) -> Tensor:
        tau_intra = self.tau_intra(batch.step, batch.total_steps)
        with full_precision(batch.s_img.embed):
            img, txt = batch.s_img.embed.float(), batch.s_txt.embed.float()
            ids, g = batch.image_ids.to(img.device), gather_pairs(img, txt, batch.image_ids, self.gather)
            rows = torch.arange(img.shape[0], device=img.device)
            same = same_image(ids, g.ids)
            labels = torch.zeros_like(rows)
            losses = []
            for anchor, same_modality, other_modality in ((img, g.img, g.txt), (txt, g.txt, g.img)):
                cross = anchor @ other_modality.T
                positive = cross[rows, rows + g.offset].unsqueeze(1) / tau_intra
                inter = (cross / self.tau_inter).masked_fill(same, float("-inf"))
                intra = (anchor @ same_modality.T / tau_intra).masked_fill(same, float("-inf"))
                losses.append(torch.nn.functional.cross_entropy(torch.cat([positive, inter, intra], dim=1), labels))
            return (losses[0] + losses[1]) / 2
