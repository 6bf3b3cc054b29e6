"""Tiny teachers built offline and the checks every teacher backend must pass: random-init open_clip
configs, a word-level tokenizer for Hugging Face models, random pixels through a teacher's transform,
and the teacher contract (shapes, unit norm, determinism, intermediates, masks)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch
from PIL import Image

from teachers import TEACHERS
from teachers.base import Teacher

CAPTIONS = ["a red dog runs on the grass", "the cat", "blue beach"]
TINY_OPENCLIP = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def save_word_tokenizer(folder: Path, words: Sequence[str], extra_special: Sequence[str] = (), bos_only: bool = False):
    """A tiny word-level fast tokenizer ([PAD]=0, [UNK]=1, <s>=2, </s>=3, then ``extra_special``, then words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", *extra_special]
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A" if bos_only else "<s> $A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=list(extra_special))
    fast.save_pretrained(folder)
    return fast


def random_pixels(teacher: Teacher, n: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` random PIL images pushed through the teacher's own transform."""
    g = torch.Generator().manual_seed(seed)
    tf = teacher.image_transform()
    imgs = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    return torch.stack([tf(im) for im in imgs])


def check_contract(t: Teacher, layers_img: Sequence[int], layers_txt: Sequence[int]) -> None:
    """Shapes, dtypes, unit norm, determinism, intermediates and masks every backend must satisfy."""
    px = random_pixels(t)
    assert px.shape == (3, 3, t.image_size, t.image_size) and px.dtype == torch.float32
    f = t.encode_image(px, layers=layers_img)
    assert f.embed.shape == (3, t.embed_dim) and f.embed.dtype == torch.float32
    torch.testing.assert_close(f.embed.norm(dim=-1), torch.ones(3))
    assert f.tokens.shape[0] == 3 and f.tokens.shape[2] == t.image_token_dim
    assert f.grid[0] * f.grid[1] == f.tokens.shape[1]
    assert sorted(f.intermediates) == sorted(f"image.{i}" for i in layers_img)
    assert all(v.shape[0] == 3 and v.dim() == 2 for v in f.intermediates.values())
    again = t.encode_image(px, layers=layers_img)
    assert torch.equal(again.embed, f.embed) and torch.equal(again.tokens, f.tokens)
    assert not torch.allclose(f.embed[0], f.embed[1])

    batch = t.tokenize(CAPTIONS)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 3
    g = t.encode_text(batch, layers=layers_txt)
    assert g.embed.shape == (3, t.embed_dim)
    torch.testing.assert_close(g.embed.norm(dim=-1), torch.ones(3))
    assert g.tokens.shape[:2] == batch["input_ids"].shape and g.tokens.shape[2] == t.text_token_dim
    assert g.mask.dtype == torch.bool and g.mask.shape == batch["input_ids"].shape
    lengths = g.mask.sum(dim=1)
    assert lengths[0] > lengths[1] > 0 and lengths[2] > 0  # longer caption -> more valid tokens
    assert sorted(g.intermediates) == sorted(f"text.{i}" for i in layers_txt)
    assert torch.equal(t.encode_text(batch).embed, g.embed)
    # one caption alone embeds like inside a padded batch
    torch.testing.assert_close(t.encode_text(t.tokenize(CAPTIONS[1:2])).embed[0], g.embed[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        t.encode_image(px, layers=[999])
    assert t.logit_scale > 0
    json.dumps(t.config())  # JSON-serialisable
    assert not any(p.requires_grad for p in t.parameters()) and not t.training


def tiny_openclip_spec(root: Path, vision_layers: int = 2) -> str:
    """``openclip:<config.json>`` of a random-init 32 px ViT (patch 8, width 32) with a 2-layer text
    tower; skips the test when the open_clip backend is unavailable."""
    if "openclip" not in TEACHERS:
        pytest.skip("openclip teacher backend not available")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": vision_layers, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = root / f"tiny_vit_{vision_layers}.json"
    path.write_text(json.dumps(cfg))
    return f"openclip:{path}"
