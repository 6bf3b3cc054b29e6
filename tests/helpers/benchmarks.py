"""Tiny benchmark settings (a 1-layer random-init open_clip teacher, a 1-block ``vit`` student) and
``run_benchmark``, which runs a ``benchmarks/`` script's ``main(argv)`` and checks its summary line and
result JSON."""
from __future__ import annotations

import json
from pathlib import Path

import torch

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
