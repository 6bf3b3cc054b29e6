"""Exporting students: open_clip ``local-dir:`` round trip and the ``students.export`` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from students import build_student, load_student
from students.export import export_open_clip, main
from tests.test_students import CAPTIONS, TINY  # importing it registers the "prunetoy" teacher


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    s = build_student("vit", **{**TINY, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}).eval()
    with torch.no_grad():
        s.logit_scale.fill_(2.5)
    return s


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((45, 60, 3)) * 255).astype(np.uint8))


def test_open_clip_local_dir_round_trip(vit, tmp_path: Path):
    out = export_open_clip(vit, tmp_path / "oc")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["head_width"] == 16 and cfg["preprocess_cfg"]["size"] == 32
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()

    pixels = torch.stack([preprocess(_image(i)) for i in range(2)])
    assert torch.equal(pixels, torch.stack([vit.image_transform()(_image(i)) for i in range(2)]))
    ids = tokenizer(CAPTIONS)
    assert torch.equal(ids, vit.tokenize(CAPTIONS)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels, normalize=True), vit.encode_image(pixels).embed)
        assert torch.equal(model.encode_text(ids, normalize=True), vit.encode_text({"input_ids": ids}).embed)
    assert model.logit_scale.item() == vit.logit_scale.item() == 2.5


def test_export_of_pruned_student_points_to_save_student(tmp_path: Path):
    pruned = build_student("pruned", teacher="prunetoy:0", image_layers=1, text_layers=1, embed_dim=8)
    with pytest.raises(TypeError, match=r"'pruned' student is not an open_clip architecture.*save_student"):
        export_open_clip(pruned, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_from_training_checkpoint(vit, tmp_path: Path, capsys):
    ckpt = tmp_path / "last.pt"
    torch.save({"student_config": vit.config(), "student": vit.state_dict()}, ckpt)
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "oc")])
    assert "wrote open_clip export of the 'vit' student" in capsys.readouterr().out
    model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x, normalize=True), vit.encode_image(x).embed)

    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "st"), "--format", "safetensors"])
    again = load_student(tmp_path / "st")
    with torch.no_grad():
        assert torch.equal(again.encode_image(x).embed, vit.encode_image(x).embed)


def test_cli_plugin_and_pruned_safetensors(tmp_path: Path):
    pruned = build_student("pruned", teacher="prunetoy:0", image_layers=2, text_layers=1, embed_dim=8)
    ckpt = tmp_path / "p.pt"
    torch.save({"student_config": pruned.config(), "student": pruned.state_dict()}, ckpt)
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "p"), "--format", "safetensors",
          "--plugin", "tests.test_students"])
    assert load_student(tmp_path / "p").config() == pruned.config()
    with pytest.raises(TypeError, match="save_student"):
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "q")])
