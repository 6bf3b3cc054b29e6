"""Train a LiT teacher: ``python -m distill.train_lit --data D --out DIR [--mode probe|finetune]``.

``--mode probe`` (default): the image backbone and text encoder stay frozen, so their pooled features are computed once
(batched, with a samples/s progress bar) and the two linear projections plus the logit scale are
trained on those features with a symmetric InfoNCE loss — many epochs take seconds. Each epoch
pairs every image with one of its captions (drawn with the seeded generator), so a batch never
holds the same image twice. The result (``lit.json`` + ``projections.safetensors``) loads as
``lit:DIR``. Runs are deterministic given ``--seed``.

``--mode finetune`` also trains the last blocks of both towers contrastively on augmented images
(:mod:`distill.pipeline.lit.finetune`), starting from ``--init`` or a short probe; the changed tower tensors
are saved in ``towers.safetensors`` beside the projections. Recall@1 is reported in percent.

The loss is the shared symmetric CLIP InfoNCE (:func:`distill.core.contrastive.clip_info_nce`) and
Recall@1 the exact core metric (:func:`distill.core.metrics.retrieval_metrics`). Library use:
:func:`train_lit` -> :class:`LiTResult`; ``main(argv)`` is the command and returns its exit code.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from distill.pipeline.cli import ArgumentParser, cli_main
from distill.pipeline.settings import Setting, check_out_folder, check_settings
from distill.core.data.dataset import ImageTextDataset
from distill.core.data.factory import load_dataset
from distill.core.errors import BadSampleError, ConfigError
from distill.core.lock import output_lock
from distill.pipeline.lit.finetune import finetune_towers, validate
from distill.pipeline.lit.probe import precompute_features, recall_at_1, train_projections
from teachers.lit import LiTConfig, LiTTeacher

@dataclass(frozen=True)
class LiTResult:
    """What :func:`train_lit` returns: the saved teacher folder (loadable as :attr:`spec`) and the
    training report, as stored under ``training`` in its ``lit.json`` (Recall@1 in percent)."""

    folder: Path
    report: dict[str, Any]

    @property
    def spec(self) -> str:
        return f"lit:{self.folder}"

    @property
    def mode(self) -> str:
        return self.report["mode"]

    @property
    def losses(self) -> list[float]:
        """Mean loss per epoch (of the fine-tuning in ``finetune`` mode, else of the probe)."""
        return list(self.report.get("losses") or [])

    @property
    def train_r1(self) -> dict[str, float] | None:
        return self.report.get("train_r1")

    @property
    def val_r1(self) -> dict[str, float] | None:
        return self.report.get("val_r1")

    def summary(self) -> dict[str, Any]:
        """The summary the command prints: mode, images, train/val Recall@1, first and last loss."""
        out = {k: self.report[k] for k in ("mode", "num_images", "train_r1", "val_r1") if k in self.report}
        losses = self.losses
        out.update({"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
        return out


#: Value rules of :func:`train_lit`'s numeric arguments, checked before any data loads (errors name the flag).
LIT_RULES = (
    Setting("epochs", "int", lambda v: v >= 1, "an integer >= 1", "--epochs"),
    Setting("batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--batch-size"),
    Setting("lr", "float", lambda v: v > 0, "a number > 0", "--lr"),
    Setting("backbone_lr", "float", lambda v: v > 0, "a number > 0", "--backbone-lr"),
    Setting("embed_dim", "int", lambda v: v >= 1, "an integer >= 1", "--embed-dim"),
    Setting("image_size", "int", lambda v: v >= 1, "an integer >= 1", "--image-size"),
    Setting("max_length", "int", lambda v: v >= 1, "an integer >= 1", "--max-length"),
    Setting("feature_batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--feature-batch-size"),
    Setting("workers", "int", lambda v: v >= 0, "an integer >= 0", "--workers"),
    Setting("max_images", "int", lambda v: v >= 1, "an integer >= 1 (omit it for every image)", "--max-images",
            nullable=True),
    Setting("trainable_image_blocks", "int", lambda v: v >= 0, "an integer >= 0", "--trainable-image-blocks"),
    Setting("trainable_text_layers", "int", lambda v: v >= 0, "an integer >= 0", "--trainable-text-layers"),
    Setting("probe_epochs", "int", lambda v: v >= 0, "an integer >= 0", "--probe-epochs"),
    Setting("val_every", "int", lambda v: v >= 1, "an integer >= 1", "--val-every"),
)


def load_split(data: str, split: str, images_root: str | None, max_images: int | None) -> ImageTextDataset:
    ds = load_dataset(data, split, images_root)
    return ds.subset(range(min(max_images, ds.num_images))) if max_images is not None else ds


def train_lit(data: str, out: str, split: str = "train", val_split: str | None = None, epochs: int = 20,
              batch_size: int = 256, lr: float = 1e-3, embed_dim: int = 256, image_size: int = 224,
              backbone: str = "mobilenet_v2", backbone_weights: str | None = None, text_model: str | None = None,
              device: str = "cpu", seed: int = 0, feature_batch_size: int = 64, workers: int = 0,
              max_images: int | None = None, max_length: int = 32, *, images_root: str | None = None,
              mode: str = "probe", backbone_lr: float = 5e-5, trainable_image_blocks: int = 4,
              trainable_text_layers: int = 2, captions: str = "one", augment: bool = True,
              init: str | None = None, probe_epochs: int = 10, val_every: int = 1) -> LiTResult:
    """Train a LiT teacher and save it into ``out`` (loadable as ``lit:<out>``); returns the folder
    and the report (also stored under ``training`` in ``lit.json``; Recall@1 values in percent).

    ``mode="probe"``: precompute the frozen towers' features, train the projections ``epochs`` epochs.
    ``mode="finetune"``: start from the projections (and towers) of ``init`` (a ``lit:`` folder, whose
    architecture is kept; ``image_size``/``seed`` come from the arguments), or else from a
    ``probe_epochs``-epoch probe, then train the last ``trainable_image_blocks`` image blocks, the last
    ``trainable_text_layers`` text layers (at ``backbone_lr``) and the projections (at ``lr``)
    contrastively for ``epochs`` epochs (see :mod:`distill.pipeline.lit.finetune`); the changed tower tensors
    are saved in ``towers.safetensors``.

    Every argument is checked before any data loads (:data:`LIT_RULES`, ``out`` a folder), and
    ``out`` is held with ``writer.lock`` for the whole run (:func:`distill.core.lock.output_lock`:
    a second run into the same folder is refused).
    """
    params = dict(locals())
    if mode not in ("probe", "finetune"):
        raise ConfigError(f"mode must be 'probe' or 'finetune', not {mode!r}")
    check_settings(dict(params), LIT_RULES, by_flag=True)
    check_out_folder(out)
    with output_lock(out):
        return _train_lit(**params)


def _train_lit(data: str, out: str, split: str, val_split: str | None, epochs: int, batch_size: int, lr: float,
               embed_dim: int, image_size: int, backbone: str, backbone_weights: str | None, text_model: str | None,
               device: str, seed: int, feature_batch_size: int, workers: int, max_images: int | None,
               max_length: int, *, images_root: str | None, mode: str, backbone_lr: float,
               trainable_image_blocks: int, trainable_text_layers: int, captions: str, augment: bool,
               init: str | None, probe_epochs: int, val_every: int) -> LiTResult:
    """:func:`train_lit` once its arguments are checked and ``out`` is locked."""
    torch.manual_seed(seed)
    train = load_split(data, split, images_root, max_images)
    val = load_split(data, val_split, images_root, max_images) if val_split else None
    kept = None
    if init:
        base = LiTTeacher.from_folder(init)
        cfg = replace(base.cfg, image_size=image_size, seed=seed, towers=None)
        kept = load_file(str(Path(init) / base.cfg.towers)) if base.cfg.towers else None
        teacher = LiTTeacher(cfg, base.projection_state(), kept)
        del base
    else:
        cfg = LiTConfig(backbone=backbone, backbone_weights=backbone_weights, text_model=text_model,
                        embed_dim=embed_dim, image_size=image_size, max_length=max_length, seed=seed)
        teacher = LiTTeacher(cfg)
    report: dict[str, Any] = {"mode": mode, "data": str(data), "split": split, "num_images": train.num_images,
                              "num_captions": train.num_captions, "fingerprint": train.fingerprint(),
                              "backbone": cfg.backbone, "image_size": image_size, "epochs": epochs,
                              "batch_size": batch_size, "lr": lr, "seed": seed, "init": init}
    towers = None
    kept_towers = sorted(kept) if kept else []  # tensors an earlier fine-tuning changed: saved again
    if mode == "probe" or (not init and probe_epochs > 0):
        teacher.to(device)
        t0 = time.time()
        img_feats, txt_feats = precompute_features(teacher, train, feature_batch_size, workers, device, desc=split)
        feature_s = time.time() - t0
        teacher.cpu()
        n = epochs if mode == "probe" else probe_epochs
        losses = train_projections(teacher, img_feats, txt_feats, train.offsets, n, batch_size, lr, seed)
        probe = {"losses": losses, "feature_seconds": round(feature_s, 2),
                 "train_r1": recall_at_1(teacher, img_feats, txt_feats, train.caption_image)}
        print(f"probe ({n} epochs): loss {losses[0]:.4f} -> {losses[-1]:.4f}, train R@1 i2t "
              f"{probe['train_r1']['i2t_r1']:.2f}% t2i {probe['train_r1']['t2i_r1']:.2f}%", file=sys.stderr)
        del img_feats, txt_feats
        if mode == "probe":
            report.update(probe)
        else:
            report["probe"] = {"epochs": probe_epochs, **probe}
            if val is not None:  # the starting point of the fine-tuning, for comparison
                r = report["probe"]["val_r1"] = validate(teacher.to(device), val, feature_batch_size, workers, device)
                teacher.cpu()
                print(f"probe {val_split} R@1: i2t {r['i2t_r1']:.2f}% t2i {r['t2i_r1']:.2f}% mean {r['mean_r1']:.2f}%",
                      file=sys.stderr)
    if mode == "finetune":
        ft = finetune_towers(teacher, train, epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
                             image_blocks=trainable_image_blocks, text_layers=trainable_text_layers, captions=captions,
                             augment=augment, seed=seed, device=device, workers=workers, val=val,
                             val_every=val_every, feature_batch_size=feature_batch_size)
        teacher.cpu()
        report.update({"backbone_lr": backbone_lr, "trainable_image_blocks": trainable_image_blocks,
                       "trainable_text_layers": trainable_text_layers, "captions": captions, "augment": augment, **ft})
        if ft["val_r1_per_epoch"]:
            report["val_split"] = val_split
            report["val_r1"] = {k: v for k, v in ft["val_r1_per_epoch"][-1].items() if k != "epoch"}
        towers = teacher.tower_state(ft["trained"] + kept_towers) if ft["trained"] or kept_towers else None
    elif kept_towers:
        towers = teacher.tower_state(kept_towers)
    if mode == "probe" and val is not None:
        teacher.to(device)
        v_img, v_txt = precompute_features(teacher, val, feature_batch_size, workers, device, desc=val_split)
        teacher.cpu()
        report["val_split"], report["val_r1"] = val_split, recall_at_1(teacher, v_img, v_txt, val.caption_image)
    if "val_r1" in report:
        r = report["val_r1"]
        print(f"{val_split} R@1: i2t {r['i2t_r1']:.2f}% t2i {r['t2i_r1']:.2f}% mean {r['mean_r1']:.2f}%", file=sys.stderr)
    teacher.save(out, {"training": report}, towers=towers)
    return LiTResult(Path(out), report)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset path (Flickr8k folder, CSV/TSV, Karpathy or COCO JSON)")
    p.add_argument("--images-root", default=None,
                   help="folder the dataset's image paths are relative to (default: beside the captions file; for "
                        "COCO annotations/captions_train2017.json pass the train2017/ folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--val-split", default=None, help="also report Recall@1 (percent) on this split")
    p.add_argument("--out", required=True, help="output folder (lit.json + projections.safetensors [+ towers])")
    p.add_argument("--mode", choices=("probe", "finetune"), default="probe",
                   help="probe: train the projections on frozen towers; finetune: also train the towers' last blocks")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the projections and logit scale")
    p.add_argument("--backbone-lr", type=float, default=5e-5, help="finetune: learning rate of the tower blocks")
    p.add_argument("--trainable-image-blocks", type=int, default=4, help="finetune: train the last K image blocks")
    p.add_argument("--trainable-text-layers", type=int, default=2, help="finetune: train the last K text layers")
    p.add_argument("--captions", choices=("one", "all"), default="one",
                   help="finetune: one random caption per image and step, or all captions as positives")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="finetune: no random resized crop + flip")
    p.add_argument("--init", default=None, help="finetune: start from this lit folder (its architecture is kept)")
    p.add_argument("--probe-epochs", type=int, default=10,
                   help="finetune without --init: first train the projections this many epochs on frozen towers")
    p.add_argument("--val-every", type=int, default=1, help="finetune: validate every N epochs (and after the last)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-length", type=int, default=32, help="caption token length")
    p.add_argument("--backbone", default="mobilenet_v2",
                   help="mobilenet_v2 | efficientnet_lite0 (offline weights), another torchvision model with "
                        ".features, or timm:<name>")
    p.add_argument("--backbone-weights", default=None, help="weights file (default: the offline ImageNet weights)")
    p.add_argument("--text-model", default=None, help="transformers folder (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images of each split")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.train_lit``: train, print the summary as JSON; returns the exit code."""
    args = parse_args(argv)
    try:
        result = train_lit(args.data, args.out, args.split, args.val_split, args.epochs, args.batch_size, args.lr,
                           args.embed_dim, args.image_size, args.backbone, args.backbone_weights, args.text_model,
                           args.device, args.seed, args.feature_batch_size, args.workers, args.max_images,
                           args.max_length, images_root=args.images_root, mode=args.mode, backbone_lr=args.backbone_lr,
                           trainable_image_blocks=args.trainable_image_blocks,
                           trainable_text_layers=args.trainable_text_layers, captions=args.captions,
                           augment=args.augment, init=args.init, probe_epochs=args.probe_epochs,
                           val_every=args.val_every)
    except BadSampleError as e:
        where = f"under --images-root {args.images_root}" if args.images_root else "relative to the captions file"
        raise BadSampleError(f"{e} (image paths are looked up {where}; pass --images-root FOLDER, e.g. "
                             "train2017/ beside annotations/ for COCO)", e.where) from None
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    cli_main(main)
