"""Image-text retrieval evaluation: Recall@1/5/10 both directions and RSUM (CLIP_benchmark protocol).

``--model`` is a teacher spec (``openclip:ViT-B-32:...``, ``lit:DIR``, ...), a student checkpoint
or exported folder, or a teacher cache folder (its stored embeddings are scored directly)::

    python -m distill.evaluate --model runs/s/student --data ../shared/data/flickr8k --split test
    python -m distill.evaluate --model lit:runs/teacher --data dataset_flickr30k.json --images-root flickr30k-images
    python -m distill.evaluate --model runs/cache_test          # a cache of the test split

An image query hits when any of its captions is in the top K; a caption query hits when its image
is. Scoring is exact and tiled (:mod:`distill.core.metrics`).

Library use: :func:`evaluate` (a model spec and a ``--data`` argument -> :class:`EvalResult`, whose
:meth:`~EvalResult.to_json` is what ``--out`` holds), :func:`evaluate_model` (a loaded model and a
dataset -> metrics) and :func:`evaluate_cache`. ``main(argv)`` is the command and returns its exit
code.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.core.cache import MANIFEST, TeacherCache
from distill.pipeline.cli import ArgumentParser, cli_main
from distill.pipeline.settings import Setting, check_args, check_out_file
from distill.core.data.dataset import ImageTextDataset, TransformedImages
from distill.core.data.factory import load_dataset
from distill.core.errors import ConfigError, NoSplitsError
from distill.core.metrics import retrieval_metrics

METRIC_ORDER = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


@torch.no_grad()
def encode_dataset(model: Any, data: ImageTextDataset, batch_size: int = 64, device: str | torch.device = "cpu",
                   num_workers: int = 0, progress: bool = True) -> tuple[Tensor, Tensor]:
    """L2-normalised image [N, D] and caption [M, D] embeddings (float32, CPU) of ``model`` (a teacher
    or a student: anything with ``image_transform``, ``encode_image``, ``tokenize``, ``encode_text``)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(TransformedImages(data, model.image_transform()), batch_size=batch_size, num_workers=num_workers)
    images = [model.encode_image(x.to(device)).embed.float().cpu()
              for x in tqdm(loader, desc="images", unit="batch", disable=not progress, leave=False)]
    texts = []
    for s in tqdm(range(0, data.num_captions, batch_size), desc="captions", unit="batch", disable=not progress,
                  leave=False):
        batch = {k: v.to(device) for k, v in model.tokenize(data.captions[s:s + batch_size]).items()}
        texts.append(model.encode_text(batch).embed.float().cpu())
    model.train(was_training)
    dim = getattr(model, "embed_dim", 0)
    return (torch.cat(images) if images else torch.zeros(0, dim)), (torch.cat(texts) if texts else torch.zeros(0, dim))


def evaluate_embeddings(image_emb: Tensor, text_emb: Tensor, caption_image: Any, ks: Sequence[int] = (1, 5, 10),
                        chunk_size: int | None = None) -> dict[str, float]:
    """Recall@K and RSUM of precomputed embeddings (``caption_image[j]`` = image of caption ``j``)."""
    return retrieval_metrics(image_emb, text_emb, torch.as_tensor(caption_image), ks, chunk_size)


def evaluate_model(model: Any, data: ImageTextDataset, batch_size: int = 64, device: str | torch.device = "cpu",
                   num_workers: int = 0, ks: Sequence[int] = (1, 5, 10), progress: bool = True) -> dict[str, float]:
    """Encode ``data`` with ``model`` and return its retrieval metrics."""
    image_emb, text_emb = encode_dataset(model, data, batch_size, device, num_workers, progress)
    return evaluate_embeddings(image_emb, text_emb, data.caption_image, ks)


def evaluate_cache(cache: TeacherCache, data: ImageTextDataset | None = None,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval metrics of the teacher embeddings stored in ``cache`` (view 0). With ``data`` the
    cache must have been built from that very dataset (same fingerprint)."""
    if data is not None:
        cache.check(dataset_fingerprint=data.fingerprint())
    image_emb = cache.images(torch.arange(cache.num_images)).embed
    text_emb = cache.texts(torch.arange(cache.num_captions)).embed
    return evaluate_embeddings(image_emb, text_emb, cache.caption_image, ks)


def first_captions(data: ImageTextDataset, k: int) -> ImageTextDataset:
    """The dataset with only the first ``k`` captions of each image (e.g. COCO's 5K test: 5 each)."""
    rank = np.arange(data.num_captions) - data.offsets[data.caption_image]
    keep = np.flatnonzero(rank < k)
    return dataclasses.replace(data, captions=[data.captions[i] for i in keep], caption_image=data.caption_image[keep])


def load_model(spec: str, device: str = "cpu") -> tuple[str, Any]:
    """``("cache", TeacherCache)``, ``("student", Student)`` or ``("teacher", Teacher)`` for ``spec``."""
    path = Path(spec)
    if path.is_dir() and (path / MANIFEST).is_file():
        return "cache", TeacherCache(path)
    if path.exists():
        from students import load_student

        return "student", load_student(path, device=device)
    from teachers import TEACHERS, create_teacher

    backend, sep, _ = spec.partition(":")
    if not sep or backend not in TEACHERS:
        raise ConfigError(f"--model {spec!r} is neither an existing student/cache path nor a teacher spec "
                          f"'<backend>:<args>' (backends: {', '.join(TEACHERS.names())})")
    return "teacher", create_teacher(spec, device=device)


def model_label(spec: str, kind: str) -> str:
    """Table label: a student is named by its run folder (``runs/x/student`` and
    ``runs/x/checkpoints/last.pt`` -> ``x``), anything else by its last path part or spec."""
    p = Path(spec)
    if kind == "student":
        p = p.resolve()
        if p.is_file():
            p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        if p.name == "student":
            p = p.parent
    return p.name or spec


def format_metrics(name: str, metrics: dict[str, float]) -> str:
    """One table row (with header) of the standard metrics."""
    head = f"{'model':<24}" + "".join(f"{c:>10}" for c in METRIC_ORDER)
    row = f"{name[-24:]:<24}" + "".join(f"{metrics[c]:>10.2f}" for c in METRIC_ORDER)
    return f"{head}\n{row}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="teacher spec, student checkpoint/folder, or teacher cache folder")
    p.add_argument("--data", help="dataset (Flickr8k folder, CSV/TSV, Karpathy or COCO JSON, webdataset shards); "
                   "optional for a cache")
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: test; all rows for a dataset without splits, with a note)")
    p.add_argument("--images-root", help="image folder for JSON/CSV datasets")
    p.add_argument("--max-captions", type=int, default=None,
                   help="use only the first K captions of each image (COCO 5K test: 5)")
    p.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON result path (default: print only)")
    args = p.parse_args(argv)
    check_args(args, ARG_RULES)
    if args.out:
        check_out_file(args.out)  # before the evaluation, not after it
    return args


#: Value checks of the numeric flags (distill.pipeline.settings.check_args).
ARG_RULES = (Setting("max_captions", "int", lambda v: v >= 1, "an integer >= 1", "--max-captions", nullable=True),
             Setting("batch_size", "int", lambda v: v >= 1, "an integer >= 1", "--batch-size"),
             Setting("num_workers", "int", lambda v: v >= 0, "an integer >= 0", "--num-workers"))


@dataclasses.dataclass
class EvalResult:
    """One evaluation: what was evaluated on which data, its size, the seconds the scoring took and
    the metrics (Recall@K both directions in percent, ``rsum``). :meth:`to_json` is the ``--out`` file."""

    model: str
    label: str
    kind: str  # "teacher", "student" or "cache"
    data: str | None
    split: str | None
    num_images: int
    num_captions: int
    skipped: list[str]
    seconds: float
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_eval_data(data: str, split: str | None, images_root: str | None, on_bad_sample: str = "error") -> ImageTextDataset:
    """The evaluation dataset: ``split`` (default ``test``; all rows, with a note on stderr, for a
    dataset without splits when no split was asked for)."""
    try:
        ds = load_dataset(data, split or "test", images_root, on_bad_sample=on_bad_sample)
    except NoSplitsError:
        if split is not None:
            raise
        print(f"note: {data} has no splits; evaluating all its rows", file=sys.stderr)
        ds = load_dataset(data, None, images_root, on_bad_sample=on_bad_sample)
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} bad sample(s): " + "; ".join(f"{s.where}: {s.reason}" for s in ds.skipped),
              file=sys.stderr)
    return ds


def evaluate(model: str, data: str | None = None, split: str | None = None, images_root: str | None = None, *,
             max_captions: int | None = None, on_bad_sample: str = "error", batch_size: int = 64,
             num_workers: int = 2, device: str = "cpu") -> EvalResult:
    """Evaluate ``model`` (a teacher spec, a student checkpoint/folder or a teacher cache folder) on
    ``data`` (optional for a cache: its stored embeddings are scored)."""
    kind, loaded = load_model(model, device)
    ds = None
    if data:
        ds = load_eval_data(data, split, images_root, on_bad_sample)
        if max_captions is not None:
            if kind == "cache":
                raise ConfigError("--max-captions applies to a teacher or a student, not to a cache")
            ds = first_captions(ds, max_captions)
    elif kind != "cache":
        raise ConfigError("--data is required to evaluate a teacher or a student")
    start = time.perf_counter()
    if kind == "cache":
        metrics = evaluate_cache(loaded, ds)
        num_images, num_captions = loaded.num_images, loaded.num_captions
    else:
        metrics = evaluate_model(loaded, ds, batch_size, device, num_workers)
        num_images, num_captions = ds.num_images, ds.num_captions
    return EvalResult(model=model, label=model_label(model, kind), kind=kind, data=data,
                      split=ds.split if ds else split, num_images=num_images, num_captions=num_captions,
                      skipped=[f"{s.where}: {s.reason}" for s in ds.skipped] if ds else [],
                      seconds=round(time.perf_counter() - start, 3), metrics=metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.evaluate``: print the metrics table (and write ``--out``); returns the exit code."""
    args = parse_args(argv)
    result = evaluate(args.model, args.data, args.split, args.images_root, max_captions=args.max_captions,
                      on_bad_sample=args.on_bad_sample, batch_size=args.batch_size, num_workers=args.num_workers,
                      device=args.device)
    print(format_metrics(result.label, result.metrics))
    print(f"{result.num_images} images, {result.num_captions} captions, {result.seconds:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_json(), indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    cli_main(main)
