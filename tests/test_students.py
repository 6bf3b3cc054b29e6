"""Students: the open_clip-backed ``vit`` student, the layer-pruned student and checkpoint I/O."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distill.core.errors import ConfigError
from distill.core.profile import count_flops
from students import create_student, load_student, save_student
from students.pruned import half_compute_layers
from students.vit_dual import VIT_PRESETS
from teachers import TEACHERS, create_teacher
from tests.helpers.students import CAPTIONS, TINY_VIT
from tests.helpers.teachers import tiny_openclip_spec


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_student("vit", **TINY_VIT).eval()


def _pixels(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- vit student
def test_vit_image_features(vit):
    f = vit.encode_image(_pixels(), layers=[0, -1])
    assert f.embed.shape == (3, 16)
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    assert f.tokens.shape == (3, 16, 32) and f.grid == (4, 4)
    assert sorted(f.intermediates) == ["image.0", "image.1"]
    assert f.intermediates["image.1"].shape == (3, 32)
    assert (vit.image_token_dim, vit.text_token_dim, vit.embed_dim) == (32, 32, 16)


def test_vit_text_features_and_mask(vit):
    batch = vit.tokenize(CAPTIONS)
    ids = batch["input_ids"]
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert ids[1].tolist()[:4] == [49406, 2368, 49407, 0]  # SOT "cat" EOT pad
    f = vit.encode_text(batch, layers=[1])
    assert f.embed.shape == (3, 16) and f.tokens.shape == (3, 16, 32)
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    assert torch.equal(f.mask, ids != 0) and f.mask[1].sum() == 3
    assert torch.equal(batch["attention_mask"].bool(), f.mask)
    assert list(f.intermediates) == ["text.1"]


def test_vit_matches_its_open_clip_model(vit):
    x, batch = _pixels(), vit.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(vit.encode_image(x).embed, vit.clip.encode_image(x, normalize=True))
        assert torch.equal(vit.encode_text(batch).embed, vit.clip.encode_text(batch["input_ids"], normalize=True))
    assert vit.logit_scale is vit.clip.logit_scale
    assert vit.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())


def test_vit_text_trimmed_padding_gives_same_embedding(vit):
    batch = vit.tokenize(CAPTIONS)
    longest = int(batch["attention_mask"].sum(1).max())
    trimmed = {k: v[:, :longest] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_text(trimmed).embed, vit.encode_text(batch).embed)
    too_long = {"input_ids": torch.ones(1, 17, dtype=torch.long)}
    with pytest.raises(ValueError, match="more than context_length=16"):
        vit.encode_text(too_long)


def test_vit_config_round_trip(vit):
    cfg = vit.config()
    assert cfg["name"] == "vit" and cfg["vision_layers"] == 2
    cfg = json.loads(json.dumps(cfg))
    again = create_student(**cfg)
    assert again.num_params() == vit.num_params()
    assert again.config() == vit.config()


def test_vit_presets_and_option_errors():
    with torch.device("meta"):
        ti = create_student("vit", preset="vit-ti16-128", vision_layers=6)
    assert (ti.cfg.vision_width, ti.cfg.image_size, ti.cfg.vision_layers, ti.cfg.context_length) == (192, 128, 6, 32)
    assert ti.config()["vision_heads"] == 3 and "preset" not in ti.config()
    with pytest.raises(KeyError, match="unknown vit preset 'nope'"):
        create_student("vit", preset="nope")
    with pytest.raises(ConfigError, match=r"^widht: unknown option of student 'vit'; known: preset, embed_dim"):
        create_student("vit", widht=3)
    with pytest.raises(ValueError, match="vision_width=30 is not divisible by vision_heads=4"):
        create_student("vit", **{**TINY_VIT, "vision_width": 30, "vision_heads": 4})
    assert set(VIT_PRESETS) >= {"vit-s16", "vit-ti16", "vit-ti16-128"}


#: what each ViT size means (the DeiT/CLIP conventions): vision width and heads, and its text tower
SIZES = {"ti": (192, 3, 256, 4), "s": (384, 6, 256, 4), "b": (768, 12, 512, 8)}


def _arch_from_name(name: str) -> dict:
    """The architecture a VIT_PRESETS name says: vit-<ti|s|b><patch>[-<px>][-d<layers>][-t<text width>]."""
    import re

    m = re.fullmatch(r"vit-(ti|s|b)(\d+)(?:-(\d+))?(?:-d(\d+))?(?:-t(\d+))?", name)
    assert m, f"{name} does not follow vit-<ti|s|b><patch>[-<px>][-d<layers>][-t<text width>]"
    size, patch, px, depth, text = m.groups()
    width, heads, text_width, text_heads = SIZES[size]
    out = {"vision_width": width, "vision_heads": heads, "patch_size": int(patch), "image_size": int(px or 224),
           "vision_layers": int(depth or 12), "text_width": int(text or text_width)}
    if not text:
        out["text_heads"] = text_heads
    return out


@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_every_vit_architecture_is_what_its_name_says(name):
    from dataclasses import asdict

    from students.vit_dual import ViTDualStudent

    arch = asdict(ViTDualStudent.resolve_config(name, {}))
    expected = _arch_from_name(name)
    assert {k: arch[k] for k in expected} == expected


@pytest.mark.parametrize("preset,arch,numbers", [
    # the numbers the cpu / gpu presets trained before they named an architecture: unchanged
    ("cpu", "vit-ti16-128-d6", dict(embed_dim=256, image_size=128, patch_size=16, vision_width=192, vision_layers=6,
                                    vision_heads=3, text_width=256, text_layers=4, text_heads=4, context_length=32)),
    ("gpu", "vit-s16-t384", dict(embed_dim=256, image_size=224, patch_size=16, vision_width=384, vision_layers=12,
                                 vision_heads=6, text_width=384, text_layers=6, text_heads=6, context_length=77)),
])
def test_config_presets_name_one_architecture(preset, arch, numbers):
    from dataclasses import asdict

    from distill.pipeline.train.config import load_preset
    from students.vit_dual import ViTDualStudent

    assert load_preset(preset)["student"] == {"name": "vit", "preset": arch}  # no widths repeated in the YAML
    resolved = asdict(ViTDualStudent.resolve_config(arch, {}))
    assert {k: resolved[k] for k in numbers} == numbers
    assert resolved["mlp_ratio"] == 4.0 and resolved["vocab_size"] == 49408


def test_vit_s16_default_param_count():
    with torch.device("meta"):
        s = create_student("vit")
    image = sum(p.numel() for p in s.clip.visual.parameters())
    assert 21.5e6 < image < 22.5e6  # ViT-S/16: 12 x 384-wide blocks + patch embed + projection
    assert s.grid == (14, 14) and s.embed_dim == 256 and s.cfg.context_length == 77


def test_vit_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = create_student("vit", **TINY_VIT)
    ckpt = create_student("vit", **{**TINY_VIT, "grad_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.clip.visual.transformer.grad_checkpointing
    x, batch = _pixels(2), plain.tokenize(CAPTIONS[:2])
    grads = []
    for s in (plain, ckpt):
        s.train()
        f, t = s(x, batch)
        (f.embed @ t.embed.T).sum().backward()
        grads.append([p.grad.clone() for p in s.shared_parameters()])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_vit_image_transform_matches_size(vit):
    from PIL import Image

    img = Image.new("RGB", (50, 40), (255, 0, 0))
    t = vit.image_transform()(img)
    assert t.shape == (3, 32, 32)
    expected_r = (1.0 - vit.mean[0]) / vit.std[0]
    torch.testing.assert_close(t[0], torch.full((32, 32), expected_r), atol=1e-4, rtol=0)
    assert vit.preprocess_info()["size"] == 32
    assert vit.tokenizer_info() == {"name": "open_clip.SimpleTokenizer", "context_length": 16,
                                    "vocab_size": 49408, "pad_id": 0}


# ---------------------------------------------------------------- save / load
def _assert_same_outputs(a, b, pixels, texts):
    with torch.no_grad():
        assert torch.equal(a.encode_image(pixels).embed, b.encode_image(pixels).embed)
        assert torch.equal(a.encode_text(a.tokenize(texts)).embed, b.encode_text(b.tokenize(texts)).embed)
    assert a.logit_scale.item() == b.logit_scale.item()


def test_save_load_folder_identical(vit, tmp_path: Path):
    with torch.no_grad():
        vit.logit_scale.fill_(3.0)
    out = save_student(vit, tmp_path / "s")
    meta = json.loads((out / "student.json").read_text())
    assert meta["config"] == vit.config() and meta["tokenizer"]["context_length"] == 16
    assert meta["preprocess"]["size"] == 32 and meta["num_params"] == vit.num_params()
    loaded = load_student(out)
    assert not loaded.training
    _assert_same_outputs(vit, loaded, _pixels(), CAPTIONS)
    assert load_student(out / "student.safetensors").config() == vit.config()


def test_load_training_checkpoint(vit, tmp_path: Path):
    path = tmp_path / "step_10.pt"
    torch.save({"student_config": vit.config(), "student": vit.state_dict(), "step": 10}, path)
    _assert_same_outputs(vit, load_student(path), _pixels(), CAPTIONS)


def test_load_errors_name_the_file(vit, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no student folder or checkpoint"):
        load_student(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing student.json"):
        load_student(tmp_path / "empty")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match=r"bad.pt: expected a checkpoint with 'student_config' and 'student', found \['model'\]"):
        load_student(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"student_config": {**vit.config(), "vision_layers": 3}, "student": vit.state_dict()}, wrong)
    with pytest.raises(RuntimeError, match="wrong.pt: student weights do not match"):
        load_student(wrong)


# ---------------------------------------------------------------- pruned student
@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    return create_student("pruned", teacher="prunetoy:0", image_layers=3, text_layers=2, embed_dim=12).eval()


def test_pruned_student_features(pruned):
    f = pruned.encode_image(_pixels())
    assert f.embed.shape == (3, 12) and f.tokens.shape == (3, 16, 24) and f.grid == (4, 4)
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    batch = pruned.tokenize(CAPTIONS)
    t = pruned.encode_text(batch)
    assert t.embed.shape == (3, 12) and t.tokens.shape == (3, 16, 20)
    assert torch.equal(t.mask, batch["attention_mask"].bool())
    assert len(pruned.image_tower.blocks) == 3 and len(pruned.text_tower.layers) == 2
    assert (pruned.image_token_dim, pruned.text_token_dim, pruned.image_size) == (24, 20, 32)
    assert pruned.config() == {"name": "pruned", "teacher": "prunetoy:0", "image_layers": 3,
                               "text_layers": 2, "embed_dim": 12, "frozen_image_layers": 0,
                               "freeze_text_embeddings": False}
    assert pruned.tokenizer_info()["name"] == "bytes" and pruned.preprocess_info()["size"] == 32


def test_pruned_student_starts_from_teacher_weights(pruned):
    teacher = create_teacher("prunetoy:0")
    torch.testing.assert_close(pruned.image_tower.patch.weight, teacher.patch.weight)
    torch.testing.assert_close(pruned.image_tower.blocks[2][0].weight, teacher.blocks[2][0].weight)
    assert all(p.requires_grad for p in pruned.parameters())
    shared = pruned.shared_parameters()
    assert shared[0] is pruned.image_tower.blocks[-1][2].weight and shared[1] is pruned.text_tower.layers[-1].weight


def test_pruned_student_save_load_and_deepcopy(pruned, tmp_path: Path):
    with torch.no_grad():
        pruned.image_proj.weight.mul_(2)
    loaded = load_student(save_student(pruned, tmp_path / "p"))
    _assert_same_outputs(pruned, loaded, _pixels(), CAPTIONS)
    _assert_same_outputs(pruned, copy.deepcopy(pruned), _pixels(), CAPTIONS)


def test_pruned_student_rejects_shared_weights():
    with pytest.raises(ValueError, match="share the teacher's weights; it must return deep copies"):
        create_student("pruned", teacher="prunetoy:0:shared", image_layers=1, text_layers=1)


def test_half_compute_layers_halves_image_flops():
    teacher = create_teacher("prunetoy:0")
    pixels = torch.zeros(1, 3, 32, 32)
    full = count_flops(lambda x: teacher.encode_image(x), pixels)
    k = half_compute_layers(teacher)
    ratio = {j: count_flops(teacher.pruned_towers(j, 1).image, pixels) / full for j in (k, k + 1)}
    assert 0.5 - 0.12 < ratio[k] <= 0.5 < ratio[k + 1]  # the deepest prefix within half the FLOPs
    assert half_compute_layers("prunetoy:0") == k


# ---------------------------------------------------------------- pruned student of a real open_clip teacher
def _openclip_teacher_spec(vit, tmp_path: Path) -> str:
    """Export the tiny vit student and use it as an ``openclip:local-dir:`` teacher."""
    if "openclip" not in TEACHERS:
        pytest.skip("openclip teacher backend not available")
    from distill.pipeline.export.main import export_open_clip

    return f"openclip:local-dir:{export_open_clip(vit, tmp_path / 'teacher')}"


def test_pruned_student_of_openclip_teacher(vit, tmp_path: Path):
    spec = _openclip_teacher_spec(vit, tmp_path)
    full = create_student("pruned", teacher=spec, image_layers=2, text_layers=2, embed_dim=8).eval()
    x, texts = _pixels(), CAPTIONS
    assert torch.equal(full.tokenize(texts)["input_ids"], vit.tokenize(texts)["input_ids"])
    with torch.no_grad():
        # keeping every block reproduces the teacher's token features exactly
        assert torch.equal(full.encode_image(x).tokens, vit.encode_image(x).tokens)
        assert torch.equal(full.encode_text(full.tokenize(texts)).tokens, vit.encode_text(vit.tokenize(texts)).tokens)
    teacher = create_teacher(spec)
    t_img, t_txt = teacher.encode_image(x, layers=[0, 1]), teacher.encode_text(vit.tokenize(texts), layers=[0])
    with torch.no_grad():  # the student's intermediates follow the teachers' pooling convention
        s_img, s_txt = vit.encode_image(x, layers=[0, 1]), vit.encode_text(vit.tokenize(texts), layers=[0])
    for name in ("image.0", "image.1"):
        torch.testing.assert_close(s_img.intermediates[name], t_img.intermediates[name])
    torch.testing.assert_close(s_txt.intermediates["text.0"], t_txt.intermediates["text.0"])
    half = create_student("pruned", teacher=spec, image_layers=1, text_layers=1, embed_dim=8).eval()
    f = half.encode_image(x)
    assert f.embed.shape == (3, 8) and f.tokens.shape == (3, 16, 32) and f.grid == (4, 4)
    loaded = load_student(save_student(half, tmp_path / "half"))
    _assert_same_outputs(half, loaded, x, texts)


def test_half_compute_layers_on_openclip_teacher(tmp_path: Path):
    teacher = create_teacher(tiny_openclip_spec(tmp_path, vision_layers=8))
    k = half_compute_layers(teacher)
    pixels = torch.zeros(1, 3, 32, 32)
    ratio = count_flops(teacher.pruned_towers(k, 1).image, pixels) / count_flops(teacher.encode_image, pixels)
    ratio_next = count_flops(teacher.pruned_towers(k + 1, 1).image, pixels) / count_flops(teacher.encode_image, pixels)
    assert k in (3, 4) and ratio <= 0.5 < ratio_next


def test_pruned_student_frozen_prefix_and_embeddings(vit, tmp_path: Path):
    spec = _openclip_teacher_spec(vit, tmp_path)
    s = create_student("pruned", teacher=spec, image_layers=2, text_layers=1, embed_dim=8,
                      frozen_image_layers=1, freeze_text_embeddings=True).train()
    frozen = [s.image_tower.visual.conv1, s.image_tower.visual.transformer.resblocks[0]]
    assert all(not m.training for m in frozen) and s.image_tower.visual.transformer.resblocks[1].training
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    opt = torch.optim.SGD([p for p in s.parameters() if p.requires_grad], lr=0.1)
    img, txt = s(_pixels(), s.tokenize(CAPTIONS))
    (img.embed @ txt.embed.T).sum().backward()
    opt.step()
    changed = {n for n, p in s.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith(("image_tower.visual.conv1", "image_tower.visual.transformer.resblocks.0.",
                                 "image_tower.visual.positional_embedding")) for n in changed)
    assert not any("token_embedding" in n for n in changed)
    assert any(n.startswith("image_tower.visual.transformer.resblocks.1.") for n in changed)
    loaded = load_student(save_student(s.eval(), tmp_path / "frozen"))
    assert loaded.config() == s.config() and not loaded.image_tower.visual.conv1.weight.requires_grad
    with pytest.raises(ValueError, match="frozen_image_layers"):
        create_student("pruned", teacher=spec, image_layers=2, text_layers=1, frozen_image_layers=3)
