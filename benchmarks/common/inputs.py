"""Benchmark inputs: synthetic or Flickr8k datasets, shallow teacher copies and real teacher caches."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.common.paths import FLICKR8K

WORDS = ["a", "the", "dog", "cat", "child", "man", "woman", "runs", "sits", "jumps", "on", "in", "near", "red",
         "blue", "green", "grass", "beach", "water", "street", "ball", "bike", "snow", "playing", "with"]


def synthetic_dataset(root: Path, n_images: int, caps_per_image: int = 5, size: int = 160, seed: int = 0) -> Path:
    """Write ``n_images`` random JPEGs and a ``captions.tsv``; returns the TSV path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for i in range(n_images):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i:05d}.jpg")
        for _ in range(caps_per_image):
            lines.append(f"images/{i:05d}.jpg\t{' '.join(rng.choice(WORDS, size=int(rng.integers(6, 16))))} .")
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def flickr8k_subset(root: Path, n_images: int, split: str = "train") -> Path:
    """A ``captions.tsv`` of the first ``n_images`` images of a Flickr8k split, the images copied
    to ``root/images`` (dataset paths must stay inside the data root)."""
    names = (FLICKR8K / "splits" / f"{split}.txt").read_text().split()[:n_images]
    if len(names) < n_images:
        raise ValueError(f"{FLICKR8K}/splits/{split}.txt lists only {len(names)} images, {n_images} requested")
    wanted = set(names)
    caps: dict[str, list[str]] = {n: [] for n in names}
    with open(FLICKR8K / "captions.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            image, _, caption = line.rstrip("\n").split("\t", 2)
            if image in wanted:
                caps[image].append(caption)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(FLICKR8K / "images" / n, root / "images" / n)
    lines = ["image\tcaption"] + [f"images/{n}\t{c}" for n in names for c in caps[n]]
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def benchmark_dataset(root: Path, n_images: int, source: str = "auto", seed: int = 0) -> tuple[Path, str]:
    """(TSV path, description): Flickr8k images (``auto`` when present, or ``flickr8k``) or
    synthetic 160 px JPEGs (``synthetic``)."""
    if source not in ("auto", "flickr8k", "synthetic"):
        raise ValueError(f"--data must be auto, flickr8k or synthetic, not {source!r}")
    use_flickr = source == "flickr8k" or (source == "auto" and (FLICKR8K / "captions.tsv").is_file())
    if use_flickr:
        return flickr8k_subset(root, n_images), f"first {n_images} Flickr8k train images ({FLICKR8K})"
    return synthetic_dataset(root, n_images, seed=seed), f"{n_images} synthetic 160 px images, 5 captions each"


def shallow_teacher_spec(spec: str, layers: int, folder: Path) -> str | None:
    """For a random-init ``openclip:<built-in model>`` spec, a spec of the same architecture with
    only ``layers`` blocks per tower (identical output shapes, a fraction of the compute); written
    as a config JSON in ``folder``. None for any other spec."""
    backend, _, rest = spec.partition(":")
    if backend != "openclip" or ":" in rest or rest.endswith(".json") or rest.startswith(("local-dir", "hf-hub")):
        return None
    import open_clip

    cfg = open_clip.get_model_config(rest)
    if cfg is None:
        return None
    cfg["vision_cfg"]["layers"] = layers
    cfg["text_cfg"]["layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rest}-{layers}blk.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return f"openclip:{path}"


def build_cache(teacher: str, tsv: Path, out: Path, batch_size: int, device: torch.device, plugins: Sequence[str] = (),
                extra: Sequence[str] = ()) -> Path:
    """Write a real teacher cache of ``tsv`` with ``python -m distill.cache_teacher`` (in-process,
    its report and progress bar suppressed so that the benchmark prints one line)."""
    from distill.pipeline.cache.main import main as cache_main

    argv = ["--teacher", teacher, "--data", str(tsv), "--out", str(out), "--batch-size", str(batch_size),
            "--num-workers", "0", "--device", str(device), *[a for m in plugins for a in ("--plugin", m)], *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache_main(argv)
    return out
