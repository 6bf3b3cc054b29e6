"""lit: teacher with the real offline MobileNetV2 + all-MiniLM-L6-v2 weights, and teachers.train_lit."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.data import load_dataset
from teachers import build_teacher
from teachers.lit import LiTTeacher
from teachers.train_lit import main as train_lit_main
from teachers.train_lit import recall_at_1, train_projections
from tests.conftest import FLICKR8K

CAPTIONS = ["a dog runs on the grass", "two children play football in a park", "a man"]


@pytest.fixture(scope="module")
def lit_default() -> LiTTeacher:
    return build_teacher("lit:default")


@pytest.fixture(scope="module")
def flickr_pixels(lit_default):
    if not (FLICKR8K / "captions.tsv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    data = load_dataset(FLICKR8K, "test").subset(range(3))
    tf = lit_default.image_transform()
    return torch.stack([tf(data.load_image(i)) for i in range(3)])


@pytest.mark.slow
def test_lit_default_features(lit_default, flickr_pixels):
    t = lit_default
    assert (t.embed_dim, t.image_token_dim, t.text_token_dim, t.image_size) == (256, 1280, 384, 224)
    assert flickr_pixels.shape == (3, 3, 224, 224)
    f = t.encode_image(flickr_pixels, layers=[3, 18])
    assert f.embed.shape == (3, 256) and f.tokens.shape == (3, 49, 1280) and f.grid == (7, 7)
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    assert f.intermediates["image.3"].shape == (3, 24)
    torch.testing.assert_close(f.intermediates["image.18"], f.tokens.mean(1))  # last block = the token map
    assert torch.equal(t.encode_image(flickr_pixels).embed, f.embed)

    batch = t.tokenize(CAPTIONS)
    assert batch["input_ids"].shape == (3, 32) and batch["input_ids"][0, 0] == 101  # [CLS]
    g = t.encode_text(batch, layers=[0, 5])
    assert g.tokens.shape == (3, 32, 384) and g.mask.sum(1).tolist() == batch["attention_mask"].sum(1).tolist()
    assert g.mask.sum(1)[1] > g.mask.sum(1)[0] > g.mask.sum(1)[2]
    m = g.mask[..., None].float()
    torch.testing.assert_close(g.intermediates["text.5"], (g.tokens * m).sum(1) / m.sum(1))
    torch.testing.assert_close(g.embed.norm(dim=-1), torch.ones(3))
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="image tower has 19 blocks"):
        t.encode_image(flickr_pixels, layers=[19])


@pytest.mark.slow
def test_lit_pruned_towers_equal_intermediates(lit_default, flickr_pixels):
    t = lit_default
    towers = t.pruned_towers(4, 2)
    assert towers.image_dim == 24 and towers.text_dim == 384 and towers.config["image_layers"] == 4
    assert len(towers.text.model.encoder.layer) == 2 and len(t.text_model.encoder.layer) == 6
    assert all(p.requires_grad for p in towers.text.parameters())
    batch = t.tokenize(CAPTIONS)
    with torch.no_grad():
        pooled, tokens, grid = towers.image(flickr_pixels)
        tpooled, ttokens, tmask = towers.text(batch)
    assert tokens.shape == (3, grid[0] * grid[1], 24) and grid == (56, 56)
    torch.testing.assert_close(pooled, t.encode_image(flickr_pixels, [3]).intermediates["image.3"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tpooled, t.encode_text(batch, [1]).intermediates["text.1"], atol=1e-5, rtol=1e-4)
    assert ttokens.shape == (3, 32, 384) and torch.equal(tmask, batch["attention_mask"].bool())


def test_train_projections_deterministic_and_learns():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(24, 12, generator=g), torch.randn(48, 10, generator=g)
    offsets = np.arange(0, 49, 2)
    runs = []
    for _ in range(2):
        t = _TinyLiT()
        losses = train_projections(t, img, txt, offsets, epochs=30, batch_size=8, lr=1e-2, seed=3)
        runs.append((losses, t.image_proj.weight.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0][-1] < 0.5 * runs[0][0][0]
    assert not t.image_proj.weight.requires_grad


class _TinyLiT(torch.nn.Module):
    """Just the trainable head of a LiT teacher, to test the projection training alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_proj, self.text_proj = torch.nn.Linear(12, 8, bias=False), torch.nn.Linear(10, 8, bias=False)
        self.log_logit_scale = torch.nn.Parameter(torch.tensor(2.0))


@pytest.mark.slow
def test_train_lit_cli_roundtrip(flickr8k, tmp_path):
    out = tmp_path / "lit"
    report = train_lit_main(["--data", str(flickr8k), "--split", "train", "--val-split", "dev", "--max-images", "12",
                             "--out", str(out), "--epochs", "15", "--batch-size", "6", "--lr", "3e-3",
                             "--embed-dim", "64", "--image-size", "128", "--device", "cpu", "--seed", "1"])
    assert report["losses"][-1] < 0.5 * report["losses"][0]
    assert report["num_images"] == 12 and report["num_captions"] == 60 and 0 <= report["val_r1"]["mean_r1"] <= 1
    saved = json.loads((out / "lit.json").read_text())
    assert saved["image_size"] == 128 and saved["embed_dim"] == 64 and saved["training"]["seed"] == 1
    t = build_teacher(f"lit:{out}")
    assert t.spec == f"lit:{out}" and t.image_size == 128 and t.embed_dim == 64
    state = load_file(str(out / "projections.safetensors"))
    assert torch.equal(t.image_proj.weight, state["image_proj.weight"])
    assert t.logit_scale == pytest.approx(state["log_logit_scale"].exp().item())
    train = load_dataset(flickr8k, "train").subset(range(12))
    tf = t.image_transform()
    px = torch.stack([tf(train.load_image(i)) for i in range(12)])
    img = t.encode_image(px).embed
    txt = torch.cat([t.encode_text(t.tokenize(train.captions[i:i + 30])).embed for i in (0, 30)])
    sim = img @ txt.T  # the reloaded teacher reproduces the training-time recall exactly
    i2t = (torch.as_tensor(train.caption_image)[sim.argmax(1)] == torch.arange(12)).float().mean().item()
    assert i2t == pytest.approx(report["train_r1"]["i2t_r1"])
    again = build_teacher(f"lit:{out}")
    assert torch.equal(again.encode_image(px).embed, img) and again.config_hash() == t.config_hash()
    assert t.config_hash() != build_teacher("lit:default").config_hash()


def test_lit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lit: model folder not found"):
        build_teacher(f"lit:{tmp_path / 'nope'}")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="lit.json not found"):
        build_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"embed_dim": 8, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        build_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(FileNotFoundError, match="projections.safetensors not found"):
        build_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"backbone": "resnet18"}))
    with pytest.raises(ValueError, match="needs backbone_weights"):
        build_teacher(f"lit:{tmp_path / 'a'}")


@pytest.mark.slow
def test_lit_projection_shape_mismatch(tmp_path):
    (tmp_path / "lit.json").write_text(json.dumps({"embed_dim": 8, "image_size": 64}))
    save_file({"image_proj.weight": torch.zeros(8, 1280), "text_proj.weight": torch.zeros(16, 384),
               "log_logit_scale": torch.tensor(1.0)}, str(tmp_path / "projections.safetensors"))
    with pytest.raises(ValueError, match=r"text_proj.weight: expected shape \(8, 384\), got \(16, 384\)"):
        build_teacher(f"lit:{tmp_path}")


def test_recall_at_1_multi_caption():
    t = _TinyLiT()
    with torch.no_grad():
        t.image_proj.weight.copy_(torch.eye(8, 12))
        t.text_proj.weight.copy_(torch.eye(8, 10))
    img = torch.eye(12)[:3]
    txt = torch.stack([torch.eye(10)[0], torch.eye(10)[0], torch.eye(10)[1], torch.eye(10)[1], torch.eye(10)[0]])
    r = recall_at_1(t, img, txt, np.array([0, 0, 1, 1, 2]))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["t2i_r1"] == pytest.approx(4 / 5)
