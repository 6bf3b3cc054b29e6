"""openclip: and hf: teacher backends on tiny random-init models built offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teachers import TEACHERS, create_teacher
from teachers.common import OutputCapture
from tests.helpers.data import WORDS
from tests.helpers.teachers import CAPTIONS, TINY_OPENCLIP, check_contract, random_pixels, save_word_tokenizer


# ================================================================================ openclip
@pytest.fixture(scope="module")
def oc_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("oc") / "tinyclip.json"
    path.write_text(json.dumps(TINY_OPENCLIP))
    return path


@pytest.fixture(scope="module")
def oc_teacher(oc_json):
    return create_teacher(f"openclip:{oc_json}")


#: the test running each built-in backend's contract on a real (tiny or offline) model
CONTRACT_TESTS = {"openclip": ("test_teachers.py", "test_openclip_contract"),
                  "hf": ("test_teachers.py", "test_hf_contract"),
                  "mllm": ("test_mllm.py", "test_mllm_contract"),
                  "lit": ("test_lit.py", "test_lit_default_features"),
                  "ensemble": ("test_ensemble.py", "test_ensemble_embeddings_are_weighted_mean_of_member_similarities")}


@pytest.mark.parametrize("name", TEACHERS.names())
def test_every_registered_teacher_backend(name):
    """Driven by the registry: every backend is a Teacher built by a ``from_spec`` classmethod whose
    spec check accepts its name; a built-in one has a contract test on a real model (a new backend
    without one fails here); the test doubles of tests/helpers build and embed to unit vectors."""
    import inspect

    from distill.core.registry import check_teacher_spec
    from teachers import Teacher

    cls = TEACHERS.get(name)
    assert issubclass(cls, Teacher) and isinstance(inspect.getattr_static(cls, "from_spec"), classmethod)
    check_teacher_spec(f"{name}:0" if name != "ensemble" else "ensemble:toy:0+toy:1")
    if cls.__module__.startswith("tests."):
        t = create_teacher(f"{name}:0")
        f = t.encode_image(random_pixels(t, 2))
        torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(2))
        return
    assert name in CONTRACT_TESTS, f"teacher backend {name!r} has no contract test (tests/helpers/teachers.check_contract)"
    file, test = CONTRACT_TESTS[name]
    assert f"def {test}(" in (Path(__file__).parent / file).read_text(encoding="utf-8"), (file, test)


def test_openclip_contract(oc_teacher):
    t = oc_teacher
    assert (t.embed_dim, t.image_token_dim, t.text_token_dim, t.image_size) == (16, 32, 32, 32)
    check_contract(t, [0, 1], [1])
    f = t.encode_image(random_pixels(t))
    assert f.grid == (4, 4)
    batch = t.tokenize(["a dog"])
    assert batch["input_ids"][0, :4].tolist()[0] == 49406 and batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 12
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert t.tokenizer_info()["context_length"] == 16 and t.preprocess_info()["size"] == [32, 32]


def test_openclip_random_init_is_reproducible_and_weights_change_hash(oc_json, oc_teacher, tmp_path):
    same = create_teacher(f"openclip:{oc_json}")
    assert same.config_hash() == oc_teacher.config_hash()
    state = oc_teacher.model.state_dict()
    torch.save(state, tmp_path / "same.pt")
    loaded = create_teacher(f"openclip:{oc_json}:{tmp_path / 'same.pt'}")
    px = random_pixels(oc_teacher)
    assert torch.equal(loaded.encode_image(px).embed, oc_teacher.encode_image(px).embed)
    state = {k: v * 1.5 if k == "visual.conv1.weight" else v for k, v in state.items()}
    torch.save(state, tmp_path / "other.pt")
    other = create_teacher(f"openclip:{oc_json}:{tmp_path / 'other.pt'}")
    assert other.config_hash() != loaded.config_hash()
    assert not torch.allclose(other.encode_image(px).embed, loaded.encode_image(px).embed)


def test_openclip_pruned_towers_match_teacher(oc_teacher):
    t = oc_teacher
    px, batch = random_pixels(t), t.tokenize(CAPTIONS)
    full = t.pruned_towers(2, 2)
    assert full.image_dim == 32 and full.text_dim == 32 and full.config["image_layers"] == 2
    assert all(p.requires_grad for p in full.image.parameters())
    with torch.no_grad():
        pooled, tokens, grid = full.image(px)
        tpooled, ttokens, tmask = full.text(batch)
    f, g = t.encode_image(px, [0]), t.encode_text(batch, [0])
    assert pooled.shape == (3, 32) and grid == (4, 4)
    torch.testing.assert_close(tokens, f.tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ttokens, g.tokens, atol=1e-5, rtol=1e-4)
    assert torch.equal(tmask, g.mask) and tpooled.shape == (3, 32)
    one = t.pruned_towers(1, 1)
    assert len(one.image.visual.transformer.resblocks) == 1 and len(t.model.visual.transformer.resblocks) == 2
    with torch.no_grad(), OutputCapture({"img": one.image.visual.transformer.resblocks[0],
                                         "txt": one.text.transformer.resblocks[0]}) as cap:
        one.image(px)
        one.text(batch)
    torch.testing.assert_close(cap.outputs["img"][:, 1:].mean(1), f.intermediates["image.0"], atol=1e-5, rtol=1e-4)
    txt = cap.outputs["txt"]
    torch.testing.assert_close((txt * g.mask[..., None]).sum(1) / g.mask.sum(1, keepdim=True),
                               g.intermediates["text.0"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot keep 3 image blocks"):
        t.pruned_towers(3, 1)


def test_openclip_resnet_tokens(tmp_path):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "tinyrn.json").write_text(json.dumps(cfg))
    t = create_teacher(f"openclip:{tmp_path / 'tinyrn.json'}")
    f = t.encode_image(random_pixels(t, 2), layers=[0, 3])
    assert f.tokens.shape == (2, 4, t.image_token_dim) and f.grid == (2, 2) and t.image_token_dim == 256
    assert f.intermediates["image.0"].shape == (2, 32) and f.intermediates["image.3"].shape == (2, 256)
    with pytest.raises(NotImplementedError, match="ViT image tower"):
        t.pruned_towers(1, 1)


def test_openclip_errors(tmp_path):
    with pytest.raises(RuntimeError, match="not in the local cache.*never does"):
        create_teacher("openclip:ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(FileNotFoundError, match="model config JSON not found"):
        create_teacher(f"openclip:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="unknown model 'NoSuchNet'"):
        create_teacher("openclip:NoSuchNet")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a pretrained tag"):
        create_teacher("openclip:ViT-B-32:/no/such/ckpt.pt")
    with pytest.raises(RuntimeError, match="never does"):
        create_teacher("openclip:hf-hub:org/model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 4}))
    with pytest.raises(ValueError, match="missing"):
        create_teacher(f"openclip:{bad}")


# ================================================================================ hf
def save_tiny_hf(folder: Path, kind: str, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = save_word_tokenizer(folder, WORDS)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=12, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(seed)
    if kind == "clip":
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():
            model.logit_scale.fill_(2.0)
            model.logit_bias.fill_(-3.0)
        model.save_pretrained(folder)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_folder(request, tmp_path_factory) -> Path:
    return save_tiny_hf(tmp_path_factory.mktemp(request.param), request.param)


def test_hf_contract(hf_folder):
    t = create_teacher(f"hf:{hf_folder}")
    siglip = hf_folder.name.startswith("siglip")
    assert (t.embed_dim, t.image_token_dim, t.text_token_dim, t.image_size) == (32 if siglip else 16, 32, 32, 32)
    check_contract(t, [0, 1], [0, 1])
    f = t.encode_image(random_pixels(t))
    assert f.tokens.shape == (3, 16, 32) and f.grid == (4, 4)  # CLIP's CLS is dropped
    batch = t.tokenize(["a dog", "zebra"])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0, :4].tolist() == [2, 14, 7, 3] and batch["attention_mask"][0].sum() == 4
    assert batch["input_ids"][1, 1] == 1  # unknown word
    if siglip:
        assert t.logit_scale == pytest.approx(torch.tensor(2.0).exp().item())
        assert t.config()["hf"]["logit_bias"] == pytest.approx(-3.0)
    else:
        assert t.config()["hf"]["logit_bias"] is None


def test_hf_pruned_towers_match_teacher(hf_folder):
    t = create_teacher(f"hf:{hf_folder}")
    px, batch = random_pixels(t), t.tokenize(CAPTIONS)
    f, g = t.encode_image(px, [0]), t.encode_text(batch, [0])
    full = t.pruned_towers(2, 2)
    with torch.no_grad():
        pooled, tokens, grid = full.image(px)
        tpooled, ttokens, tmask = full.text(batch)
    torch.testing.assert_close(tokens, f.tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ttokens, g.tokens, atol=1e-5, rtol=1e-4)
    assert grid == (4, 4) and torch.equal(tmask, g.mask) and pooled.shape == (3, 32) and tpooled.shape == (3, 32)
    one = t.pruned_towers(1, 1)
    assert len(one.image.tower.encoder.layers) == 1 and len(t.model.vision_model.encoder.layers) == 2
    with torch.no_grad(), OutputCapture({"img": one.image.tower.encoder.layers[0],
                                         "txt": one.text.tower.encoder.layers[0]}) as cap:
        one.image(px)
        one.text(batch)
    img = cap.outputs["img"] if hf_folder.name.startswith("siglip") else cap.outputs["img"][:, 1:]
    torch.testing.assert_close(img.mean(1), f.intermediates["image.0"], atol=1e-5, rtol=1e-4)
    m = g.mask[..., None]
    torch.testing.assert_close((cap.outputs["txt"] * m).sum(1) / m.sum(1), g.intermediates["text.0"],
                               atol=1e-5, rtol=1e-4)


def test_hf_hash_follows_weights(tmp_path):
    a = create_teacher(f"hf:{save_tiny_hf(tmp_path / 'a', 'clip', seed=0)}")
    b = create_teacher(f"hf:{save_tiny_hf(tmp_path / 'b', 'clip', seed=1)}")
    a2 = create_teacher(f"hf:{tmp_path / 'a'}")
    assert a.config_hash() == a2.config_hash() and a.config_hash() != b.config_hash()


def test_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf: model folder not found"):
        create_teacher(f"hf:{tmp_path / 'nope'}")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="holds a BertModel; supported: CLIPModel, SiglipModel"):
        create_teacher(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(ValueError, match="spec .* must look like"):
        create_teacher("hf")
