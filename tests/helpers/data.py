"""Tiny on-disk datasets: random JPEGs and a ``captions.tsv`` built from a small word list."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["red", "green", "blue", "dog", "cat", "runs", "sits", "on", "grass", "beach", "a", "the"]


def make_tiny_dataset(root: Path, n_images: int = 12, caps_per_image: int = 2, size: int = 40, seed: int = 0) -> Path:
    """Write ``n_images`` random JPEGs and a ``captions.tsv`` (image, caption); returns the TSV path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption"]
    for i in range(n_images):
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        arr[: size // 2] = arr[: size // 2] // 4 + (i * 20) % 200
        Image.fromarray(arr).save(root / "images" / f"img{i:03d}.jpg", quality=90)
        for k in range(caps_per_image):
            words = rng.choice(WORDS, size=4)
            lines.append(f"images/img{i:03d}.jpg\t{' '.join(words)} {i} {k}")
    tsv = root / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def write_jpeg(path: Path, seed: int) -> None:
    """A 40x40 random JPEG with a seed-dependent colour band (so images are distinguishable)."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    arr[:20] = arr[:20] // 4 + (seed * 20) % 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def make_tiny_flickr8k(root: Path, n_train: int = 8, n_test: int = 4, caps_per_image: int = 2) -> Path:
    """A Flickr8k-layout folder (``images/``, ``captions.tsv`` with caption ids, ``splits/train.txt``
    and ``splits/test.txt``) of random JPEGs; returns the folder."""
    names = [f"img{i:03d}.jpg" for i in range(n_train + n_test)]
    lines = ["image\tcaption_id\tcaption"]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        write_jpeg(root / "images" / name, i)
        lines += [f"{name}\t{k}\t{' '.join(rng.choice(WORDS, size=4))} {i} {k}" for k in range(caps_per_image)]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "splits" / "test.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root
