"""``hf:<local folder>`` — a transformers ``CLIPModel`` or ``SiglipModel`` saved with ``save_pretrained``
(plus its tokenizer and image processor), loaded with ``local_files_only=True``.

Image tokens: the vision tower's final patch tokens (CLIP: CLS dropped, ``post_layernorm``
applied like the pooled CLS; SigLIP: the already-normalised last hidden state) at the vision width.
Text tokens: the text tower's last hidden state (after its final layer norm) at the text width, mask
= the tokenizer's attention mask. Captions are padded to the text tower's full context so every
batch has the same length. Intermediates ``image.<i>`` / ``text.<i>`` are the hidden states after
encoder layer ``i`` mean-pooled over patch tokens / valid text tokens. SigLIP's ``logit_bias`` is
recorded in :meth:`config`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, SiglipModel

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from distill.core.errors import ConfigError
from distill.core.registry import TEACHERS
from teachers.base import PrunedTowers, Teacher, TextBatch
from teachers.common import check_layers, check_prune_depth, require_dir
from distill.core.towers import tokenize_padded

SUPPORTED = (CLIPModel, SiglipModel)


@TEACHERS.register("hf")
class HFTeacher(Teacher):
    """A transformers CLIP / SigLIP dual encoder behind the :class:`Teacher` interface."""

    @classmethod
    def from_spec(cls, rest: str) -> "HFTeacher":
        """Build from the spec after ``hf:``: ``rest`` is a local folder."""
        if not rest:
            raise ConfigError("hf spec needs a folder: hf:<local folder>")
        return cls(rest)

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = require_dir(folder, "hf", "expected a folder written by save_pretrained")
        self.spec = f"hf:{folder}"
        self.model = AutoModel.from_pretrained(self.folder, local_files_only=True)
        if not isinstance(self.model, SUPPORTED):
            raise ConfigError(f"hf: {self.folder} holds a {type(self.model).__name__}; supported: "
                             f"{', '.join(c.__name__ for c in SUPPORTED)}")
        self.is_siglip = isinstance(self.model, SiglipModel)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        vc, tc = self.model.config.vision_config, self.model.config.text_config
        self.context_length = int(tc.max_position_embeddings)
        self.image_token_dim, self.text_token_dim = int(vc.hidden_size), int(tc.hidden_size)
        self.embed_dim = int(vc.hidden_size if self.is_siglip else self.model.config.projection_dim)
        self.image_size = int(vc.image_size)
        self.grid = (self.image_size // vc.patch_size,) * 2
        self.freeze()

    # ----------------------------------------------------------------------------- preprocessing
    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        processor = self.processor

        def transform(image: Image.Image) -> Tensor:
            return processor(images=image, return_tensors="pt")["pixel_values"][0]

        return transform

    def preprocess_info(self) -> dict[str, Any]:
        p = self.processor
        return {"processor": type(p).__name__, "size": self.image_size,
                "resize": dict(p.size) if hasattr(p, "size") and p.size else None,
                "crop": dict(p.crop_size) if getattr(p, "do_center_crop", False) else None,
                "resample": int(p.resample) if getattr(p, "resample", None) is not None else None,
                "mean": list(p.image_mean), "std": list(p.image_std)}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return tokenize_padded(self.tokenizer, texts, self.context_length)

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": type(self.tokenizer).__name__, "path": str(self.folder), "context_length": self.context_length,
                "pad_id": self.tokenizer.pad_token_id, "vocab_size": len(self.tokenizer)}

    # ----------------------------------------------------------------------------- encoders
    def _patch_tokens(self, hidden: Tensor) -> Tensor:
        return hidden if self.is_siglip else hidden[:, 1:]

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        vm = self.model.vision_model
        layers = check_layers(layers, len(vm.encoder.layers), "image")
        out = vm(pixel_values=pixels, output_hidden_states=bool(layers))
        if self.is_siglip:
            embed, tokens = out.pooler_output, out.last_hidden_state
        else:
            embed = self.model.visual_projection(out.pooler_output)
            tokens = vm.post_layernorm(out.last_hidden_state[:, 1:])
        inter = {f"image.{i}": self._patch_tokens(out.hidden_states[i + 1]).mean(dim=1) for i in layers}
        return ImageFeatures(l2_normalize(embed), tokens, self.grid, inter)

    def _text_mask_arg(self, batch: TextBatch) -> Tensor | None:
        """SigLIP was trained on max-length padded text without an attention mask."""
        return None if self.is_siglip else batch["attention_mask"]

    @torch.no_grad()
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        tm = self.model.text_model
        layers = check_layers(layers, len(tm.encoder.layers), "text")
        mask = batch["attention_mask"].bool()
        out = tm(input_ids=batch["input_ids"], attention_mask=self._text_mask_arg(batch),
                 output_hidden_states=bool(layers))
        embed = out.pooler_output if self.is_siglip else self.model.text_projection(out.pooler_output)
        inter = {f"text.{i}": masked_mean(out.hidden_states[i + 1], mask) for i in layers}
        return TextFeatures(l2_normalize(embed), out.last_hidden_state, mask, inter)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def config(self) -> dict[str, Any]:
        bias = getattr(self.model, "logit_bias", None)
        return {**super().config(), "hf": {"architecture": type(self.model).__name__,
                                           "logit_bias": float(bias.item()) if bias is not None else None}}

    # ----------------------------------------------------------------------------- pruning
    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        vm, tm = self.model.vision_model, self.model.text_model
        ki = check_prune_depth(image_layers, len(vm.encoder.layers), "image")
        kt = check_prune_depth(text_layers, len(tm.encoder.layers), "text")
        return PrunedTowers(image=HFImagePrefix(vm, ki, self.is_siglip, self.grid),
                            text=HFTextPrefix(tm, kt, self.is_siglip),
                            image_dim=self.image_token_dim, text_dim=self.text_token_dim,
                            config={"teacher": self.spec, "image_layers": ki, "text_layers": kt})


def _first_layers_copy(tower: nn.Module, k: int) -> nn.Module:
    """Deep copy of a transformers vision/text tower keeping the first ``k`` encoder layers (trainable)."""
    kept = tower.encoder.layers
    tower.encoder.layers = kept[:k]
    try:
        clone = copy.deepcopy(tower)
    finally:
        tower.encoder.layers = kept
    clone.config = copy.deepcopy(tower.config)
    clone.config.num_hidden_layers = k
    return clone.requires_grad_(True)


class HFImagePrefix(nn.Module):
    """Embeddings + first k vision layers + final norm; pooled like the teacher (CLIP: CLS, SigLIP: head)."""

    def __init__(self, tower: nn.Module, k: int, is_siglip: bool, grid: tuple[int, int]) -> None:
        super().__init__()
        self.tower, self.is_siglip, self.grid = _first_layers_copy(tower, k), is_siglip, grid

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        out = self.tower(pixel_values=pixels)
        tokens = out.last_hidden_state if self.is_siglip else self.tower.post_layernorm(out.last_hidden_state[:, 1:])
        return out.pooler_output, tokens, self.grid


class HFTextPrefix(nn.Module):
    """Embeddings + first k text layers + final norm; pooled like the teacher (CLIP: EOS, SigLIP: head)."""

    def __init__(self, tower: nn.Module, k: int, is_siglip: bool) -> None:
        super().__init__()
        self.tower, self.is_siglip = _first_layers_copy(tower, k), is_siglip

    def forward(self, batch: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch["attention_mask"]
        out = self.tower(input_ids=batch["input_ids"], attention_mask=None if self.is_siglip else mask)
        return out.pooler_output, out.last_hidden_state, mask.bool()
