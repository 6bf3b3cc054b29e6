"""ensemble: teacher spec on tiny random-init members (tests/helpers/toy_teachers.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.core.cache.reader import TeacherCache
from distill.pipeline.cache.main import main as cache_main
from distill.core.errors import ConfigError
from distill.core.data.factory import load_dataset
from teachers import create_teacher
from teachers.ensemble import EnsembleTeacher, parse_members
from tests.helpers.teachers import CAPTIONS, random_pixels


def check_basic(t, layers_img, layers_txt) -> None:
    """The parts of the teacher contract that the toy members satisfy: shapes, unit norm, masks, frozen."""
    px = random_pixels(t)
    assert px.shape == (3, 3, t.image_size, t.image_size)
    f = t.encode_image(px, layers=layers_img)
    assert f.embed.shape == (3, t.embed_dim) and f.tokens.shape == (3, 16, t.image_token_dim) and f.grid == (4, 4)
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    assert sorted(f.intermediates) == sorted(f"image.{i}" for i in layers_img)
    g = t.encode_text(t.tokenize(CAPTIONS), layers=layers_txt)
    assert g.embed.shape == (3, t.embed_dim) and g.tokens.shape == (3, 16, t.text_token_dim)
    torch.testing.assert_close(g.embed.norm(dim=-1), torch.ones(3))
    assert g.mask.sum(1).tolist() == [min(len(c), 16) for c in CAPTIONS]  # the first member's byte tokens
    assert sorted(g.intermediates) == sorted(f"text.{i}" for i in layers_txt)
    json.dumps(t.config())
    assert not any(p.requires_grad for p in t.parameters()) and not t.training


def sims(teacher, pixels, texts):
    return teacher.encode_image(pixels).embed @ teacher.encode_text(teacher.tokenize(texts)).embed.T


def test_ensemble_embeddings_are_weighted_mean_of_member_similarities():
    ens = create_teacher("ensemble:toy:0+toy:1")
    a, b = create_teacher("toy:0"), create_teacher("toy:1")
    assert isinstance(ens, EnsembleTeacher) and ens.spec == "ensemble:toy:0+toy:1" and ens.shared_pixels
    assert ens.embed_dim == 32 and ens.weights == [0.5, 0.5] and ens.logit_scale == 50.0
    check_basic(ens, [0, 2], [1])
    px = random_pixels(ens, 4)
    torch.testing.assert_close(sims(ens, px, CAPTIONS), 0.5 * (sims(a, px, CAPTIONS) + sims(b, px, CAPTIONS)))
    f, g = ens.encode_image(px, layers=[2]), a.encode_image(px, layers=[2])
    assert torch.equal(f.tokens, g.tokens) and f.grid == g.grid and torch.equal(f.intermediates["image.2"], g.intermediates["image.2"])
    batch = ens.tokenize(CAPTIONS)
    assert sorted(batch) == ["attention_mask", "input_ids", "m1.attention_mask", "m1.input_ids"]
    t = ens.encode_text(batch, layers=[1])
    assert torch.equal(t.tokens, a.encode_text(a.tokenize(CAPTIONS)).tokens) and t.mask.shape == (3, 16)
    assert ens.config()["ensemble"] == [{"spec": "toy:0", "weight": 0.5}, {"spec": "toy:1", "weight": 0.5}]
    assert ens.config_hash() != create_teacher("ensemble:toy:0+toy:2").config_hash()
    assert ens.config_hash() == create_teacher("ensemble:toy:0+toy:1").config_hash()


def test_ensemble_yaml_weights(tmp_path):
    path = tmp_path / "members.yaml"
    path.write_text("members:\n  - spec: toy:0\n    weight: 3\n  - toy:1\n")
    ens = create_teacher(f"ensemble:{path}")
    assert ens.weights == [0.75, 0.25] and ens.spec == f"ensemble:{path}"
    a, b = create_teacher("toy:0"), create_teacher("toy:1")
    px = random_pixels(ens, 3)
    torch.testing.assert_close(sims(ens, px, CAPTIONS), 0.75 * sims(a, px, CAPTIONS) + 0.25 * sims(b, px, CAPTIONS))
    (tmp_path / "list.json").write_text(json.dumps(["toy:0", {"spec": "toy:1", "weight": 1}, "toy:2"]))
    assert [w for _, w in parse_members(str(tmp_path / "list.json"))] == pytest.approx([1 / 3] * 3)


def test_ensemble_mixed_preprocessing_feeds_each_member_its_own_pixels():
    ens = create_teacher("ensemble:toy:0+widetoy:1")
    a, b = create_teacher("toy:0"), create_teacher("widetoy:1")
    assert not ens.shared_pixels and ens.image_size == 32 and ens.embed_dim == 24
    info = ens.preprocess_info()
    assert info["mean"] == [0.0] * 3 and info["std"] == [1.0] * 3 and info["members"][1]["size"] == 48
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).byte().numpy()) for _ in range(3)]
    px = torch.stack([ens.image_transform()(im) for im in imgs])
    assert px.shape == (3, 3, 32, 32) and 0 <= px.min() and px.max() <= 1
    emb = ens.encode_image(px).embed
    # member 0 gets exactly its own preprocessing; member 1 the shared pixels resized to 48 px and normalised
    ref0 = a.encode_image(torch.stack([a.image_transform()(im) for im in imgs])).embed
    up = F.interpolate(px, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    ref1 = b.encode_image((up - 0.5) / 0.5).embed
    torch.testing.assert_close(emb, torch.cat([ref0 * 0.5 ** 0.5, ref1 * 0.5 ** 0.5], dim=1))
    check_basic(ens, [1], [0])


def test_ensemble_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs members"):
        create_teacher("ensemble:")
    with pytest.raises(ConfigError, match="member 'toy0' is not a teacher spec"):
        create_teacher("ensemble:toy:0+toy0")
    with pytest.raises(ConfigError, match="members file not found"):
        create_teacher(f"ensemble:{tmp_path / 'nope.yaml'}")
    (tmp_path / "w.yaml").write_text("- spec: toy:0\n  weight: -1\n- toy:1\n")
    with pytest.raises(ConfigError, match=r"member 'toy:0' has weight -1.0; weights must be > 0"):
        create_teacher(f"ensemble:{tmp_path / 'w.yaml'}")
    (tmp_path / "k.yaml").write_text("- {spec: toy:0, colour: red}\n")
    with pytest.raises(ConfigError, match=r"members\[0\] must be a spec string or \{spec, weight\}"):
        create_teacher(f"ensemble:{tmp_path / 'k.yaml'}")


def test_cache_teacher_with_ensemble(tiny_tsv, tmp_path):
    spec = "ensemble:toy:0+widetoy:1"
    assert cache_main(["--plugin", "tests.helpers.toy_teachers", "--teacher", spec, "--data", str(tiny_tsv), "--out",
                       str(tmp_path / "c"), "--num-workers", "0", "--batch-size", "5", "--layers", "image.1"]) == 0
    cache = TeacherCache(tmp_path / "c")
    ens, ds = create_teacher(spec), load_dataset(tiny_tsv)
    cache.check(ens.config_hash(), ds.fingerprint())
    assert cache.logit_scale == 50.0
    ids = np.array([0, 7, 11])
    tf = ens.image_transform()
    ref = ens.encode_image(torch.stack([tf(ds.load_image(i)) for i in ids]), layers=[1])
    got = cache.images(ids)
    assert got.embed.shape == (3, 24) and got.tokens.shape == (3, 16, 24)
    torch.testing.assert_close(got.embed, ref.embed, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.intermediates["image.1"], ref.intermediates["image.1"], atol=2e-3, rtol=2e-3)
    caps = np.array([0, 5, 23])
    t = cache.texts(caps)
    tref = ens.encode_text(ens.tokenize([ds.captions[c] for c in caps]))
    torch.testing.assert_close(t.embed, tref.embed, atol=2e-3, rtol=2e-3)
    assert torch.equal(t.mask, tref.mask)


@pytest.mark.slow
def test_ensemble_of_real_lit_towers_prunes_first_member(tmp_path):
    """MobileNetV2 LiT (ImageNet normalisation) + EfficientNet-Lite0 LiT ([-1, 1]): mixed preprocessing;
    the pruned student starts from the first member's blocks, fed normalised pixels."""
    from students.pruned import PrunedStudent
    from teachers.lit import LiTConfig, LiTTeacher

    LiTTeacher(LiTConfig(image_size=64, embed_dim=16)).save(tmp_path / "mnv2")
    LiTTeacher(LiTConfig(backbone="efficientnet_lite0", image_size=96, embed_dim=8)).save(tmp_path / "eff")
    spec = f"ensemble:lit:{tmp_path / 'mnv2'}+lit:{tmp_path / 'eff'}"
    ens, a = create_teacher(spec), create_teacher(f"lit:{tmp_path / 'mnv2'}")
    assert not ens.shared_pixels and ens.image_size == 64 and ens.embed_dim == 24
    img = Image.fromarray((torch.rand(70, 90, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    px = ens.image_transform()(img)[None]
    torch.testing.assert_close(ens.encode_image(px).embed[:, :16] * 2 ** 0.5,
                               a.encode_image(a.image_transform()(img)[None]).embed, atol=1e-5, rtol=1e-4)
    towers, ref = ens.pruned_towers(4, 1), a.pruned_towers(4, 1)
    with torch.no_grad():
        torch.testing.assert_close(towers.image(px)[0], ref.image(a.image_transform()(img)[None])[0], atol=1e-5, rtol=1e-4)
    student = PrunedStudent(spec, image_layers=4, text_layers=1, embed_dim=8, frozen_image_layers=2)
    batch = student.tokenize(CAPTIONS)
    assert "m1.input_ids" in batch and student.preprocess_info()["mean"] == [0.0, 0.0, 0.0]
    assert student.encode_image(px).embed.shape == (1, 8) and student.encode_text(batch).embed.shape == (3, 8)
