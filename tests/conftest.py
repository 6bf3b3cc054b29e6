"""Shared fixtures: tiny on-disk datasets and the shared Flickr8k folder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("FLICKR8K_DIR", REPO.parent / "shared" / "data" / "flickr8k"))
WORDS = ["red", "green", "blue", "dog", "cat", "runs", "sits", "on", "grass", "beach", "a", "the"]


def tiny_openclip_spec(root: Path, vision_layers: int = 2) -> str:
    """``openclip:<config.json>`` of a random-init 32 px ViT (patch 8, width 32) with a 2-layer text
    tower; skips the test when the open_clip backend is unavailable."""
    import json

    from teachers import TEACHERS

    if "openclip" not in TEACHERS:
        pytest.skip("openclip teacher backend not available")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": vision_layers, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = root / f"tiny_vit_{vision_layers}.json"
    path.write_text(json.dumps(cfg))
    return f"openclip:{path}"


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


@pytest.fixture
def tiny_tsv(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture
def flickr8k() -> Path:
    if not (FLICKR8K / "captions.tsv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    return FLICKR8K


@pytest.fixture
def toy_teacher():
    import tests.toy_teacher  # noqa: F401  (registers "toy")
    from teachers import create_teacher

    return create_teacher("toy:0")
