"""Contrastive fine-tuning of a LiT teacher's towers (``python -m distill.train_lit --mode finetune``).

The last ``image_blocks`` backbone blocks, the last ``text_layers`` text-encoder layers, both
projections and the logit scale are trained with a (multi-positive) symmetric InfoNCE on augmented
images (random resized crop + horizontal flip). The frozen prefix of each tower is recomputed every
step, but since none of its parameters or inputs need gradients autograd records nothing there, so
a step costs one forward of the towers plus a backward through the trained suffix only. The
teacher stays in eval mode (BatchNorm running statistics and dropout off) throughout. The pretrained
towers get their own, lower learning rate (``backbone_lr``); the schedule is a linear warm-up then a
cosine decay to zero.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms as T
from tqdm import tqdm

from distill.core.errors import ConfigError
from distill.core.data.dataset import ImageTextDataset
from distill.core.towers import trim_padding
from teachers.lit import LiTTeacher
from distill.pipeline.lit.probe import MAX_LOG_SCALE, contrastive_loss, precompute_features, recall_at_1

CAPTION_MODES = ("one", "all")


def trainable_prefixes(teacher: LiTTeacher, image_blocks: int, text_layers: int) -> list[str]:
    """``state_dict`` name prefixes of the last ``image_blocks`` backbone blocks and the last
    ``text_layers`` text-encoder layers (the parts fine-tuning trains and saves)."""
    blocks, layers = teacher._blocks(), len(teacher.text_model.encoder.layer)
    if image_blocks and not blocks:
        raise ConfigError(f"lit: backbone {teacher.cfg.backbone!r} has no block list; use --trainable-image-blocks 0")
    if not 0 <= image_blocks <= len(blocks):
        raise ConfigError(f"--trainable-image-blocks {image_blocks}: the image tower has {len(blocks)} blocks (0..{len(blocks)})")
    if not 0 <= text_layers <= layers:
        raise ConfigError(f"--trainable-text-layers {text_layers}: the text tower has {layers} layers (0..{layers})")
    return ([f"backbone.{i}." for i in range(len(blocks) - image_blocks, len(blocks))]
            + [f"text_model.encoder.layer.{i}." for i in range(layers - text_layers, layers)])


def augment_transform(teacher: LiTTeacher, min_scale: float = 0.5) -> T.Compose:
    """Training views: random resized crop (``min_scale``..1 of the area) + horizontal flip, then the
    teacher's normalisation."""
    return T.Compose([T.RandomResizedCrop(teacher.image_size, scale=(min_scale, 1.0),
                                          interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*teacher.normalization)])


class _IndexedViews:
    """(transformed image, image index) pairs for a DataLoader."""

    def __init__(self, data: ImageTextDataset, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.data.load_image(i)), i


def pick_captions(offsets: np.ndarray, images: Tensor, mode: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Caption indices for a batch of images and, for each caption, its image's position in the batch:
    one random caption per image (``"one"``) or all of them (``"all"``)."""
    start = torch.as_tensor(offsets[images.numpy()])
    counts = torch.as_tensor(offsets[images.numpy() + 1]) - start
    if mode == "one":
        pick = (torch.rand(len(images), generator=gen) * counts).long().clamp_max(counts - 1)
        return start + pick, torch.arange(len(images))
    owner = torch.repeat_interleave(torch.arange(len(images)), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return start[owner] + torch.arange(len(owner)) - first, owner


def validate(teacher: LiTTeacher, val: ImageTextDataset, batch_size: int, workers: int, device: str) -> dict[str, float]:
    """Recall@1 (percent) of the current teacher on ``val`` with the eval transform."""
    img, txt = precompute_features(teacher, val, batch_size, workers, device, desc="val")
    teacher.cpu()
    r = recall_at_1(teacher, img, txt, val.caption_image)
    teacher.to(device)
    return r


def finetune_towers(teacher: LiTTeacher, train: ImageTextDataset, *, epochs: int, batch_size: int, lr: float,
                    backbone_lr: float, image_blocks: int, text_layers: int, captions: str = "one",
                    augment: bool = True, seed: int = 0, device: str = "cpu", workers: int = 0,
                    weight_decay: float = 1e-4, warmup: float = 0.05, val: ImageTextDataset | None = None,
                    val_every: int = 1, feature_batch_size: int = 64) -> dict[str, Any]:
    """Fine-tune ``teacher`` in place (frozen again afterwards); returns losses, val R@1 per
    validated epoch (percent) and the trained ``state_dict`` prefixes."""
    if captions not in CAPTION_MODES:
        raise ConfigError(f"captions must be one of {CAPTION_MODES}, not {captions!r}")
    if train.num_images < 2 or batch_size < 2:
        raise ConfigError(f"fine-tuning needs >= 2 images and --batch-size >= 2 (got {train.num_images}, {batch_size})")
    prefixes = trainable_prefixes(teacher, image_blocks, text_layers)
    teacher.to(device)
    head = [teacher.image_proj.weight, teacher.text_proj.weight, teacher.log_logit_scale]
    towers = [p for n, p in teacher.named_parameters() if n.startswith(tuple(prefixes))] if prefixes else []
    for p in head + towers:
        p.requires_grad_(True)
    groups = [{"params": head, "lr": lr}] + ([{"params": towers, "lr": backbone_lr}] if towers else [])
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    batch_size = min(batch_size, train.num_images)
    steps_per_epoch = train.num_images // batch_size
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, int(round(warmup * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws (workers=0) from the global RNG
    views = _IndexedViews(train, augment_transform(teacher) if augment else teacher.image_transform())
    loader = DataLoader(views, batch_size=batch_size, drop_last=True, num_workers=workers,
                        sampler=RandomSampler(views, generator=torch.Generator().manual_seed(seed)))
    offsets = train.offsets
    n_train = sum(p.numel() for p in towers)
    print(f"fine-tuning {len(prefixes)} tower blocks ({n_train / 1e6:.2f}M parameters, lr {backbone_lr:g}) + projections "
          f"(lr {lr:g}): {epochs} epochs x {steps_per_epoch} steps of {batch_size} images, captions={captions}, "
          f"augment={augment}", file=sys.stderr)
    losses: list[float] = []
    val_r1: list[dict[str, float]] = []
    t0 = time.time()
    for epoch in range(epochs):
        total_loss, count = 0.0, 0
        with tqdm(loader, desc=f"finetune epoch {epoch + 1}/{epochs}", unit="step", dynamic_ncols=True) as bar:
            for pixels, idx in bar:
                caps, owner = pick_captions(offsets, idx, captions, gen)
                tokens = trim_padding(teacher.tokenize([train.captions[c] for c in caps.tolist()]))
                batch = {k: v.to(device) for k, v in tokens.items()}
                fmap, _ = teacher.image_backbone(pixels.to(device))
                img = teacher.image_proj(fmap.mean(dim=(2, 3)))
                txt = teacher.text_proj(teacher.text_encoder(batch)[1])
                loss = contrastive_loss(img, txt, owner.to(device), teacher.log_logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    teacher.log_logit_scale.clamp_(0.0, MAX_LOG_SCALE)
                total_loss, count = total_loss + loss.item() * len(idx), count + len(idx)
                bar.set_postfix(loss=f"{loss.item():.4f}", scale=f"{teacher.logit_scale:.1f}")
        losses.append(total_loss / max(count, 1))
        line = f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, logit scale {teacher.logit_scale:.1f}"
        if val is not None and ((epoch + 1) % max(1, val_every) == 0 or epoch + 1 == epochs):
            with torch.no_grad():
                r = validate(teacher, val, feature_batch_size, workers, device)
            val_r1.append({"epoch": epoch + 1, **r})
            line += f", val R@1 i2t {r['i2t_r1']:.2f}% t2i {r['t2i_r1']:.2f}% mean {r['mean_r1']:.2f}%"
        print(f"{line} ({time.time() - t0:.0f} s)", file=sys.stderr)
    teacher.freeze()
    return {"losses": losses, "val_r1_per_epoch": val_r1, "trained": prefixes, "trained_parameters": n_train,
            "finetune_seconds": round(time.time() - t0, 1), "steps": epochs * steps_per_epoch}

