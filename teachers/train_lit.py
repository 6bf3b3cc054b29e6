"""Train the projections of a LiT teacher: ``python -m teachers.train_lit --data D --out DIR``.

The image backbone and text encoder stay frozen, so their pooled features are computed once
(batched, with a samples/s progress bar) and the two linear projections plus the logit scale are
trained on those features with a symmetric InfoNCE loss — many epochs take seconds. Each epoch
pairs every image with one of its captions (drawn with the seeded generator), so a batch never
holds the same image twice. The result (``lit.json`` + ``projections.safetensors``) loads as
``lit:DIR``. Runs are deterministic given ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.cli import ArgumentParser, cli_main, import_plugins
from distill.data import ImageTextDataset, TransformedImages, load_dataset
from teachers.lit import LiTConfig, LiTTeacher

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
            batch = {k: v.to(device) for k, v in teacher.tokenize(chunk).items()}
            texts.append(teacher.text_encoder(batch)[1].float().cpu())
            bar.update(len(chunk))
    return torch.cat(images), torch.cat(texts)


def info_nce(img: Tensor, txt: Tensor, log_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) embeddings."""
    logits = log_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def recall_at_1(teacher: LiTTeacher, img_feats: Tensor, txt_feats: Tensor, caption_image: np.ndarray) -> dict[str, float]:
    """Image->text and text->image Recall@1 of the projected features (multi-caption protocol)."""
    with torch.no_grad():
        img = F.normalize(teacher.image_proj(img_feats), dim=-1)
        txt = F.normalize(teacher.text_proj(txt_feats), dim=-1)
        sim = img @ txt.T
    owner = torch.as_tensor(caption_image)
    i2t = (owner[sim.argmax(dim=1)] == torch.arange(len(img))).float().mean().item()
    t2i = (sim.argmax(dim=0) == owner).float().mean().item()
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
                loss = info_nce(teacher.image_proj(img_feats[ii]), teacher.text_proj(txt_feats[tt]), teacher.log_logit_scale)
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


def train_lit(data: str, out: str, split: str = "train", val_split: str | None = None, epochs: int = 20,
              batch_size: int = 256, lr: float = 1e-3, embed_dim: int = 256, image_size: int = 224,
              backbone: str = "mobilenet_v2", backbone_weights: str | None = None, text_model: str | None = None,
              device: str = "cpu", seed: int = 0, feature_batch_size: int = 64, workers: int = 0,
              max_images: int | None = None, max_length: int = 32) -> dict[str, Any]:
    """Precompute frozen features, train the projections, save ``lit.json`` + weights into ``out``."""
    torch.manual_seed(seed)
    cfg = LiTConfig(backbone=backbone, backbone_weights=backbone_weights, text_model=text_model,
                    embed_dim=embed_dim, image_size=image_size, max_length=max_length, seed=seed)
    teacher = LiTTeacher(cfg).to(device)
    train = load_dataset(data, split)
    if max_images:
        train = train.subset(range(min(max_images, train.num_images)))
    t0 = time.time()
    img_feats, txt_feats = precompute_features(teacher, train, feature_batch_size, workers, device, desc=split)
    feature_s = time.time() - t0
    teacher.cpu()
    losses = train_projections(teacher, img_feats, txt_feats, train.offsets, epochs, batch_size, lr, seed)
    report: dict[str, Any] = {"data": str(data), "split": split, "num_images": train.num_images,
                              "num_captions": train.num_captions, "fingerprint": train.fingerprint(),
                              "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                              "losses": losses, "feature_seconds": round(feature_s, 2),
                              "train_r1": recall_at_1(teacher, img_feats, txt_feats, train.caption_image)}
    if val_split:
        val = load_dataset(data, val_split)
        if max_images:
            val = val.subset(range(min(max_images, val.num_images)))
        teacher.to(device)
        v_img, v_txt = precompute_features(teacher, val, feature_batch_size, workers, device, desc=val_split)
        teacher.cpu()
        report["val_split"], report["val_r1"] = val_split, recall_at_1(teacher, v_img, v_txt, val.caption_image)
    teacher.save(out, {"training": report})
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset path (Flickr8k folder, CSV/TSV, Karpathy or COCO JSON)")
    p.add_argument("--split", default="train")
    p.add_argument("--val-split", default=None, help="also report Recall@1 on this split")
    p.add_argument("--out", required=True, help="output folder (lit.json + projections.safetensors)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-length", type=int, default=32, help="caption token length")
    p.add_argument("--backbone", default="mobilenet_v2", help="torchvision model with .features, or timm:<name>")
    p.add_argument("--backbone-weights", default=None, help="weights file (default: offline ImageNet MobileNetV2)")
    p.add_argument("--text-model", default=None, help="transformers folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--plugin", action="append", default=[], help="module to import first (repeatable)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import_plugins(args.plugin)
    report = train_lit(args.data, args.out, args.split, args.val_split, args.epochs, args.batch_size, args.lr,
                       args.embed_dim, args.image_size, args.backbone, args.backbone_weights, args.text_model,
                       args.device, args.seed, args.feature_batch_size, args.workers, args.max_images, args.max_length)
    summary = {k: report[k] for k in ("num_images", "train_r1") if k in report}
    summary.update({"first_loss": report["losses"][0] if report["losses"] else None,
                    "last_loss": report["losses"][-1] if report["losses"] else None, "val_r1": report.get("val_r1")})
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    cli_main(main)
