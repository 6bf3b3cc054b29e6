"""Tiny benchmark settings (a 1-layer random-init open_clip teacher, a 1-block ``vit`` student) and
``run_benchmark``, which runs a ``benchmarks/`` script's ``main(argv)`` and checks its summary line and
result JSON; ``mini_flickr8k``, a Flickr8k-layout folder of the bundled sample's first images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_flickr8k"

TINY_TEACHER = {"embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_STUDENT = {"embed_dim": 32, "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "image_size": 32,
                "patch_size": 8, "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16}


def run_benchmark(module, tmp_path: Path, capsys, *argv: str) -> dict:
    """Run ``module.main`` and return its result record; checks the single summary line."""
    out = tmp_path / "result.json"
    returned = module.main([*argv, "--out", str(out)])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{module.NAME}: ") and lines[0].endswith(f"[{out}]")
    record = json.loads(out.read_text())
    assert record["benchmark"] == module.NAME and record["results"] == json.loads(json.dumps(returned))
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["cpu_count"] >= 1
    return record


def mini_flickr8k(root: Path, n_train: int = 24, n_test: int = 12) -> Path:
    """A Flickr8k-layout folder with the first images of the bundled sample's splits."""
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    keep: set[str] = set()
    for split, n in (("train", n_train), ("test", n_test)):
        names = (SAMPLE / "splits" / f"{split}.txt").read_text().split()[:n]
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        keep.update(names)
    for name in keep:
        shutil.copy(SAMPLE / "images" / name, root / "images" / name)
    lines = (SAMPLE / "captions.tsv").read_text().splitlines()
    (root / "captions.tsv").write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.split("\t")[0] in keep]) + "\n")
    return root
