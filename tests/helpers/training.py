"""Tiny training runs: the tiny ``vit`` student of the training tests (width 32, 2 blocks, 32 px /
patch 8, 1 text layer, context 16), the CLI arguments of a short CPU run, a simulated kill at a
step, teacher targets poisoned with NaN/Inf, a first training step, and a small BatchNorm net."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

TINY_STUDENT = {"embed_dim": 32, "vision_width": 32, "vision_layers": 2, "vision_heads": 2, "image_size": 32,
                "patch_size": 8, "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16}
BAD_IMAGES = (1, 5)  # the images whose teacher targets ``poisoned_fetch`` makes non-finite


def train_args(cache: Path, tsv: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """CLI arguments of a tiny CPU run."""
    sets = [f"student.{k}={v}" for k, v in TINY_STUDENT.items()] + ["train.warmup_steps=2", "train.checkpoint_every=4"]
    return ["--cache", str(cache), "--data", str(tsv), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--lr", "1e-3", "--num-workers", "0", "--device", "cpu", "--seed", "0",
            *[a for s in sets for a in ("--set", s)], *extra]


def die_at(monkeypatch: pytest.MonkeyPatch, kill_at: int) -> None:
    """Make the training loop raise (like an interrupt) when it starts step index ``kill_at``."""
    from distill.pipeline.train import loop as tl

    real = tl.train_step

    def dying(run, batches, step):
        if step == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real(run, batches, step)

    monkeypatch.setattr(tl, "train_step", dying)


def assert_same_training_state(a: dict, b: dict, queue: bool = False) -> None:
    """Two checkpoints hold bit-identical student weights and, per stage, loss and balancer states
    (and the shared teacher queue with ``queue``)."""
    parts = [("student", a["student"], b["student"])]
    if queue:
        parts.append(("queue", a["shared"]["queue"], b["shared"]["queue"]))
    parts += [(f"stages.{i}.{key}", x[key], y[key]) for i, (x, y) in enumerate(zip(a["stages"], b["stages"]))
              for key in ("losses", "balancer")]
    for part, x, y in parts:
        assert x.keys() == y.keys(), part
        for k, v in x.items():
            assert torch.equal(v, y[k]), (part, k)


def poisoned_fetch(real, field: str = "image.embed"):
    """``fetch_teacher`` whose targets of BAD_IMAGES are NaN (``image.embed``) or +Inf (``text.tokens``),
    as a cache written with NaN/overflowing teacher outputs would deliver them."""

    def poisoned(cache, image_index, *args, **kwargs):
        t = real(cache, image_index, *args, **kwargs)
        rows = torch.from_numpy(np.isin(image_index, BAD_IMAGES))
        tower, name = field.split(".")
        getattr(getattr(t, tower), name)[rows] = float("nan") if field == "image.embed" else float("inf")
        return t

    return poisoned


def poison_targets(monkeypatch: pytest.MonkeyPatch, field: str = "image.embed") -> None:
    """Poison the teacher targets of BAD_IMAGES (see ``poisoned_fetch``) for the rest of the test."""
    import distill.pipeline.train.data as td

    monkeypatch.setattr(td, "fetch_teacher", poisoned_fetch(td.fetch_teacher, field))


def first_step(tiny: tuple[Path, Path], tmp_path: Path, *sets: str):
    """(run, logged fields) after one training step of the tiny run on ``tiny`` (tsv, cache) with
    the ``--set`` overrides ``sets``."""
    from distill.core.dist import DistInfo
    from distill.pipeline.train import loop as tl
    from distill.pipeline.train import main as ts

    tsv, cache = tiny
    args = ts.build_parser().parse_args(train_args(cache, tsv, tmp_path, 3, *[a for s in sets for a in ("--set", s)]))
    run = ts.setup(ts.config_from_args(args), DistInfo(0, 1, 0, torch.device("cpu")))
    fields, *_ = tl.train_step(run, tl.epoch_batches(run, 0, 0), 0)
    return run, fields


def bn_net() -> nn.Module:
    """Conv/BatchNorm layers: a frozen prefix in eval mode (0-1), trainable BatchNorms with and without
    affine parameters (2, 3) and one with frozen parameters left in train mode (4)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),  # 0-1: frozen prefix (eval)
                        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),  # 2: trainable
                        nn.BatchNorm2d(4, affine=False),  # 3: trainable, no affine parameters
                        nn.BatchNorm2d(4))  # 4: parameters frozen, left in train mode
    net[1].eval()
    net[0].requires_grad_(False)
    net[1].requires_grad_(False)
    net[4].requires_grad_(False)
    return net
