"""The probe half of LiT teacher training, shared by the probe (:mod:`distill.pipeline.lit.train`)
and the tower fine-tuning (:mod:`distill.pipeline.lit.finetune`): pooled frozen-tower features, the
contrastive loss, Recall@1 of the projected features and the projection training on features."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.core.contrastive import clip_info_nce
from distill.core.data.dataset import ImageTextDataset, TransformedImages
from distill.core.metrics import retrieval_metrics
from distill.core.towers import trim_padding
from teachers.lit import LiTTeacher

MAX_LOG_SCALE = math.log(100.0)


@torch.no_grad()
def precompute_features(teacher: LiTTeacher, data: ImageTextDataset, batch_size: int = 64, workers: int = 0,
                        device: str = "cpu", desc: str = "") -> tuple[Tensor, Tensor]:
    """Pooled frozen-tower features: (images [N, Ci], captions [M, Ct]) as float32 on CPU."""
    loader = DataLoader(TransformedImages(data, teacher.image_transform()), batch_size=batch_size, num_workers=workers)
    images = []
    with tqdm(total=data.num_images, desc=f"{desc} image features", unit="img", dynamic_ncols=True) as bar:
        for pixels in loader:
            fmap, _ = teacher.image_backbone(pixels.to(device))
            images.append(fmap.mean(dim=(2, 3)).float().cpu())
            bar.update(len(pixels))
    texts = []
    with tqdm(total=data.num_captions, desc=f"{desc} text features", unit="cap", dynamic_ncols=True) as bar:
        for start in range(0, data.num_captions, batch_size):
            chunk = data.captions[start:start + batch_size]
            batch = {k: v.to(device) for k, v in trim_padding(teacher.tokenize(chunk)).items()}
            texts.append(teacher.text_encoder(batch)[1].float().cpu())
            bar.update(len(chunk))
    return torch.cat(images), torch.cat(texts)


def contrastive_loss(img: Tensor, txt: Tensor, owner: Tensor, log_scale: Tensor) -> Tensor:
    """LiT's symmetric InfoNCE with several captions per image: ``txt[j]`` belongs to
    ``img[owner[j]]``; :func:`distill.core.contrastive.clip_info_nce` on the L2-normalised
    embeddings at scale ``exp(log_scale)``.

    Text->image is a plain cross-entropy; image->text averages the cross-entropy over each image's
    positives (SupCon-style, ``average_positives``), so with one caption per image
    (``owner = arange``) this is the usual symmetric InfoNCE.
    """
    ids = torch.arange(len(img), device=img.device)
    return clip_info_nce(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), log_scale.exp(), ids, owner,
                         average_positives=True)


def recall_at_1(teacher: LiTTeacher, img_feats: Tensor, txt_feats: Tensor, caption_image: np.ndarray) -> dict[str, float]:
    """Image->text and text->image Recall@1 in percent of the projected features (multi-caption
    protocol, :func:`distill.core.metrics.retrieval_metrics`)."""
    with torch.no_grad():
        img = F.normalize(teacher.image_proj(img_feats), dim=-1)
        txt = F.normalize(teacher.text_proj(txt_feats), dim=-1)
    m = retrieval_metrics(img, txt, caption_image, ks=(1,))
    i2t, t2i = m["i2t_R@1"], m["t2i_R@1"]
    return {"i2t_r1": i2t, "t2i_r1": t2i, "mean_r1": (i2t + t2i) / 2}


def sample_pairs(caption_offsets: np.ndarray, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A shuffled image order and one random caption index per image."""
    n = len(caption_offsets) - 1
    order = torch.randperm(n, generator=gen)
    counts = torch.as_tensor(np.diff(caption_offsets))
    pick = (torch.rand(n, generator=gen) * counts).long().clamp_max(counts - 1)
    caps = torch.as_tensor(caption_offsets[:-1]) + pick
    return order, caps[order]


def train_projections(teacher: LiTTeacher, img_feats: Tensor, txt_feats: Tensor, offsets: np.ndarray, epochs: int,
                      batch_size: int, lr: float, seed: int, weight_decay: float = 1e-4) -> list[float]:
    """Train ``image_proj``, ``text_proj`` and the logit scale in place; returns the mean loss per epoch."""
    params = [teacher.image_proj.weight, teacher.text_proj.weight, teacher.log_logit_scale]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with tqdm(range(epochs), desc="train projections", unit="epoch", dynamic_ncols=True) as bar:
        for _ in bar:
            order, caps = sample_pairs(offsets, gen)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                ii, tt = order[start:start + batch_size], caps[start:start + batch_size]
                if len(ii) < 2:
                    continue
                loss = contrastive_loss(teacher.image_proj(img_feats[ii]), teacher.text_proj(txt_feats[tt]),
                                        torch.arange(len(ii), device=img_feats.device), teacher.log_logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    teacher.log_logit_scale.clamp_(0.0, MAX_LOG_SCALE)
                total, count = total + loss.item() * len(ii), count + len(ii)
            losses.append(total / max(count, 1))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    for p in params:
        p.requires_grad_(False)
    return losses
