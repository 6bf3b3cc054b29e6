"""mllm: teacher on a tiny random-init Llava (tiny CLIP vision + tiny Llama) built offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.core.features import l2_normalize, masked_mean
from teachers import create_teacher
from tests.helpers.data import WORDS
from tests.helpers.teachers import check_contract, random_pixels, save_word_tokenizer

PROMPT_WORDS = "summarize above image sentence in one word : two children play football park man".split()


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    tok = save_word_tokenizer(folder, [w.lower() for w in WORDS + PROMPT_WORDS], extra_special=["<image>"], bos_only=True)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def mllm(llava_dir):
    return create_teacher(f"mllm:{llava_dir}")


def with_config(src: Path, dst: Path, **cfg) -> Path:
    shutil.copytree(src, dst)
    (dst / "mllm.json").write_text(json.dumps(cfg))
    return dst


def test_mllm_contract(mllm):
    t = mllm
    assert (t.embed_dim, t.image_token_dim, t.text_token_dim, t.image_size) == (32, 32, 32, 32)
    check_contract(t, [0, 1], [0, 1])
    f = t.encode_image(random_pixels(t))
    assert f.tokens.shape == (3, 16, 32) and f.grid == (4, 4)  # 4x4 patches -> 16 image tokens
    assert t.logit_scale == 50.0 and t.config()["mllm"]["pooling"] == "last"


def test_mllm_text_mask_marks_caption_tokens(mllm):
    t = mllm
    batch = t.tokenize(["a red dog", "the cat sits"])
    assert batch["input_ids"].shape == (2, t.context_length)
    for row, caption in enumerate(["a red dog", "the cat sits"]):
        inside = batch["input_ids"][row][batch["text_mask"][row].bool()].tolist()
        assert inside == t.tokenizer(caption, add_special_tokens=False)["input_ids"]
        prompt_len = int(batch["attention_mask"][row].sum())
        assert prompt_len == len(t.tokenizer(t.cfg.text_prompt.replace("<sent>", caption))["input_ids"])
    g = t.encode_text(batch)
    assert torch.equal(g.mask, batch["text_mask"].bool())
    last = batch["attention_mask"].sum(1) - 1  # last-token pooling of the final hidden state
    torch.testing.assert_close(g.embed, l2_normalize(g.tokens[torch.arange(2), last]))


def test_mllm_mean_pooling_and_truncation(llava_dir, mllm, tmp_path):
    t = create_teacher(f"mllm:{with_config(llava_dir, tmp_path / 'm', pooling='mean', max_text_tokens=3, logit_scale=20)}")
    batch = t.tokenize(["a red dog runs on the grass"])
    assert batch["text_mask"].sum() == 3 and t.logit_scale == 20.0
    g = t.encode_text(batch)
    torch.testing.assert_close(g.embed, l2_normalize(masked_mean(g.tokens, batch["attention_mask"].bool())))
    px = random_pixels(t)
    assert not torch.allclose(t.encode_image(px).embed, mllm.encode_image(px).embed)
    assert t.config_hash() != mllm.config_hash()  # same weights, different prompting config


def test_mllm_hash_follows_weights(llava_dir, mllm, tmp_path):
    assert create_teacher(f"mllm:{llava_dir}").config_hash() == mllm.config_hash()
    other = create_teacher(f"mllm:{save_tiny_llava(tmp_path / 'other', seed=1)}")
    assert other.config_hash() != mllm.config_hash()


def test_mllm_errors(llava_dir, mllm, tmp_path):
    with pytest.raises(FileNotFoundError, match="mllm: model folder not found"):
        create_teacher(f"mllm:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        create_teacher(f"mllm:{with_config(llava_dir, tmp_path / 'a', temperature=0.1)}")
    with pytest.raises(ValueError, match="must contain '<sent>'"):
        create_teacher(f"mllm:{with_config(llava_dir, tmp_path / 'b', text_prompt='Summarize:')}")
    with pytest.raises(ValueError, match="image_prompt must contain the image token"):
        create_teacher(f"mllm:{with_config(llava_dir, tmp_path / 'c', image_prompt='an image')}")
    with pytest.raises(NotImplementedError, match="does not support layer pruning"):
        mllm.pruned_towers(1, 1)
