"""Exporting students: open_clip ``local-dir:`` round trip, ONNX and Hugging Face ``CLIPModel``
exports with parity checks on the bundled sample, and the ``distill.export`` CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from students import create_student, load_student
from distill.core.errors import ExportError
from distill.pipeline.cli import run_cli
from distill.pipeline.export.main import ExportResult, export_open_clip, export_student, main
from tests.helpers.students import CAPTIONS, TINY_VIT


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    s = create_student("vit", **{**TINY_VIT, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}).eval()
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
    pruned = create_student("pruned", teacher="prunetoy:0", image_layers=1, text_layers=1, embed_dim=8)
    with pytest.raises(TypeError, match=r"'pruned' student is not an open_clip architecture.*only 'vit'.*--format onnx"):
        export_open_clip(pruned, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_from_training_checkpoint(vit, tmp_path: Path, capsys):
    ckpt = tmp_path / "last.pt"
    torch.save({"student_config": vit.config(), "student": vit.state_dict()}, ckpt)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "oc")]) == 0
    assert "wrote open_clip export of the 'vit' student" in capsys.readouterr().out
    model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x, normalize=True), vit.encode_image(x).embed)

    result = export_student(ckpt, tmp_path / "st", "safetensors")
    assert result == ExportResult(tmp_path / "st", "safetensors", "vit", vit.num_params(), {})
    again = load_student(tmp_path / "st")
    with torch.no_grad():
        assert torch.equal(again.encode_image(x).embed, vit.encode_image(x).embed)


def test_cli_plugin_and_pruned_safetensors(tmp_path: Path, capsys):
    pruned = create_student("pruned", teacher="prunetoy:0", image_layers=2, text_layers=1, embed_dim=8)
    ckpt = tmp_path / "p.pt"
    torch.save({"student_config": pruned.config(), "student": pruned.state_dict()}, ckpt)
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "p"), "--format", "safetensors",
          "--plugin", "tests.helpers.toy_teachers"])
    assert load_student(tmp_path / "p").config() == pruned.config()
    # the default format (open_clip) on a pruned student: a typed error, one clear line, nothing written
    with pytest.raises(ExportError, match=r"^the 'pruned' student is not an open_clip architecture.*--format onnx"):
        export_student(ckpt, tmp_path / "q")
    assert run_cli(main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "q")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and re.match(r"^error: the 'pruned' student is not an open_clip architecture.*--format onnx",
                                      err[0])
    assert run_cli(main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "q"), "--format", "hf"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: the 'pruned' student has no Hugging Face CLIPModel equivalent")
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- ONNX / Hugging Face exports
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_flickr8k"
LONG = " ".join(["a very long caption about a dog"] * 20)  # truncated to the context length


def _sample(student, n: int = 5) -> tuple[torch.Tensor, list[str]]:
    """``n`` bundled sample images preprocessed for ``student`` and one caption each (plus a long one)."""
    from distill.core.data.factory import load_dataset

    data = load_dataset(SAMPLE, "test").subset(range(n))
    tf = student.image_transform()
    return torch.stack([tf(data.load_image(i)) for i in range(n)]), [data.captions_of(i)[0] for i in range(n)] + [LONG]


def _check_onnx(student, out: Path) -> None:
    from distill.pipeline.export.onnx import export_onnx, onnx_parity

    export_onnx(student, out)
    meta = json.loads((out / "onnx_export.json").read_text())
    assert meta["config"] == student.config() and meta["image_encoder"]["inputs"] == ["pixels"]
    pixels, captions = _sample(student)  # batch 5/6: the files were traced at batch 2 (dynamic axis)
    parity = onnx_parity(student, out, pixels, captions)
    assert parity["image"] >= 0.9999 and parity["text"] >= 0.9999, parity


def test_onnx_vit_parity_on_sample(vit, tmp_path: Path):
    _check_onnx(vit, tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())["text_encoder"]["inputs"] == ["input_ids"]


def test_onnx_pruned_parity_on_sample(tmp_path: Path):
    torch.manual_seed(0)
    pruned = create_student("pruned", teacher="prunetoy:0", image_layers=2, text_layers=1, embed_dim=8).eval()
    _check_onnx(pruned, tmp_path / "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mwa", "pmf"])
def test_onnx_tuned_parity_on_sample(name, tmp_path: Path):
    from teachers.lit import LiTConfig, LiTTeacher

    LiTTeacher(LiTConfig(image_size=64, embed_dim=32, seed=3)).save(tmp_path / "lit")
    student = create_student(name, teacher=f"lit:{tmp_path / 'lit'}").eval()
    with torch.no_grad():  # non-zero adapters / prompt outputs so the new modules are exercised
        for n, p in student.named_parameters():
            if p.requires_grad and ("up." in n or "image_out" in n):
                p.normal_(0, 0.05)
    _check_onnx(student, tmp_path / "onnx")


def test_hf_clipmodel_offline_parity_on_sample(vit, tmp_path: Path):
    from transformers import CLIPModel, CLIPTokenizer

    from distill.pipeline.export.hf import export_hf, hf_parity

    out = export_hf(vit, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_act"] == cfg["vision_config"]["hidden_act"] == "gelu"
    assert cfg["projection_dim"] == 16 and cfg["text_config"]["eos_token_id"] == 49407
    model = CLIPModel.from_pretrained(str(out), local_files_only=True)
    assert model.logit_scale.item() == pytest.approx(2.5)
    pixels, captions = _sample(vit)
    tok = CLIPTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, vit.tokenize(captions)["input_ids"])  # same ids, pad 0, EOT kept when truncated
    parity = hf_parity(vit, out, pixels, captions)
    assert parity["image"] >= 0.9999 and parity["text"] >= 0.9999, parity


def test_hf_refuses_a_non_causal_text_tower(tmp_path: Path):
    from distill.pipeline.export.hf import export_hf
    from distill.core.errors import HFExportError

    student = create_student("vit", **{**TINY_VIT, "causal_text": False})
    with pytest.raises(HFExportError, match="not causal.*--format onnx"):
        export_hf(student, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_onnx_and_hf_report_parity(vit, tmp_path: Path, capsys):
    ckpt = tmp_path / "last.pt"
    torch.save({"student_config": vit.config(), "student": vit.state_dict()}, ckpt)
    for fmt, files in (("onnx", ["image_encoder.onnx", "text_encoder.onnx"]), ("hf", ["config.json", "model.safetensors"])):
        assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert f"wrote {fmt} export of the 'vit' student" in out
        image, text = (float(x.rstrip(",")) for x in out.split("image ")[1].split(", text "))
        assert image >= 0.9999 and text >= 0.9999
        assert all((tmp_path / fmt / f).is_file() for f in files)
