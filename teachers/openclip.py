"""``openclip:<model>[:<pretrained tag or checkpoint path>]`` — any open_clip model as a teacher.

``<model>`` is a built-in open_clip name (``ViT-B-32``), ``local-dir:<folder>`` (a folder with
``open_clip_config.json`` + weights) or the path of a model config JSON
(``{"embed_dim", "vision_cfg", "text_cfg"}``), which lets tests build tiny random models offline.
Without a pretrained part the weights are a seeded random init (same spec -> same weights).
Pretrained tags are only used when the weights are already in the local cache: this toolkit never
downloads.

Token features: ViT image tokens are the patch tokens of the final block after ``ln_post`` (no
CLS, no ``proj``), i.e. at the transformer width; ModifiedResNet image tokens are the flattened
``layer4`` feature map. Text tokens are the ``ln_final`` outputs at the text width with mask
``input_ids != pad``. Intermediates ``image.<i>`` / ``text.<i>`` are the residual stream after
block ``i`` (0-based), mean-pooled over patch tokens / valid text tokens.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from PIL import Image
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from distill.core.registry import TEACHERS
from teachers.base import PrunedTowers, Teacher, TextBatch
from teachers.common import OutputCapture, check_layers, check_prune_depth, require_dir, seeded
from distill.core.towers import feature_map_tokens

SCHEMAS = ("local-dir:", "hf-hub:")


def parse_spec(rest: str) -> tuple[str, str | None]:
    """``<model>[:<pretrained>]`` -> (model, pretrained or None); ``local-dir:``/``hf-hub:`` kept."""
    if not rest:
        raise ConfigError("openclip spec needs a model: openclip:<model>[:<pretrained tag or checkpoint path>]")
    prefix = next((s for s in SCHEMAS if rest.startswith(s)), "")
    name, _, pretrained = rest[len(prefix):].partition(":")
    return prefix + name, pretrained or None


def _register_config_json(path: Path) -> str:
    """Register a model config JSON with open_clip; returns the model name (the file stem)."""
    if not path.is_file():
        raise FileNotFoundError(f"openclip: model config JSON not found: {path}")
    cfg = json.loads(path.read_text())
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ConfigError(f"openclip: {path} is not an open_clip model config (missing {missing})")
    open_clip.add_model_config(path)  # later additions win, so this file is what the stem resolves to
    if open_clip.get_model_config(path.stem) != cfg:
        raise ConfigError(f"openclip: could not register {path} under the name {path.stem!r}")
    return path.stem


def _cached_weights(pretrained_cfg: dict[str, Any]) -> str | None:
    """Local path of a pretrained tag's weights if already downloaded, else None (never downloads)."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(pretrained_cfg["hf_hub"])  # "org/name/" means the default file names
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    if pretrained_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(pretrained_cfg["url"])
        if path.is_file():
            return str(path)
    return None


def _resolve_model(model: str) -> str:
    if model.startswith("hf-hub:"):
        raise RuntimeError(f"openclip: {model!r} needs a download from the Hugging Face Hub, which this toolkit never "
                           "does; save the model locally and use openclip:local-dir:<folder>")
    if model.startswith("local-dir:"):
        require_dir(model[len("local-dir:"):], "openclip", "local-dir: needs a folder with open_clip_config.json")
        return model
    if model.endswith(".json"):
        return _register_config_json(Path(model).expanduser())
    if model.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(f"openclip: unknown model {model!r}; use a built-in name (e.g. ViT-B-32), "
                         "local-dir:<folder> or a model config .json path")
    return model


def _create(model: str, pretrained: str | None) -> nn.Module:
    """Build the open_clip model, loading weights only from local files."""
    kwargs: dict[str, Any] = {}
    if pretrained is not None and not model.startswith("local-dir:"):
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if tag_cfg:
            local = _cached_weights(tag_cfg)
            if local is None:
                raise RuntimeError(
                    f"openclip: pretrained tag {pretrained!r} of {model!r} is not in the local cache and would need a "
                    "download, which this toolkit never does; download it beforehand or pass a checkpoint path")
            kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                              if k in tag_cfg}
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            pretrained = local
        elif not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise FileNotFoundError(f"openclip: {pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                                    f"{model!r} (known tags: {tags})")
    with seeded(0):  # random-init parts are reproducible from the spec alone
        return open_clip.create_model(model, pretrained=pretrained, pretrained_text=False, **kwargs)


@TEACHERS.register("openclip")
class OpenClipTeacher(Teacher):
    """An open_clip CLIP / CustomTextCLIP model behind the :class:`Teacher` interface."""

    @classmethod
    def from_spec(cls, rest: str) -> "OpenClipTeacher":
        """Build from the spec after ``openclip:``: ``rest`` is ``<model>[:<pretrained>]``."""
        return cls(*parse_spec(rest))

    def __init__(self, model: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.model_name = _resolve_model(model)
        self.pretrained = pretrained
        self.spec = f"openclip:{model}" + (f":{pretrained}" if pretrained else "")
        self.model = _create(self.model_name, pretrained)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        self._text = self.model.text if hasattr(self.model, "text") else self.model
        visual = self.model.visual
        if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
            visual.output_tokens = True
            self.image_token_dim = visual.transformer.width
        elif isinstance(visual, ModifiedResNet):
            self.image_token_dim = visual.layer4[-1].bn3.num_features
        else:
            self.image_token_dim = 0  # other towers (timm) give embeddings only
        self.text_token_dim = self._text.transformer.width if hasattr(self._text, "ln_final") else 0
        with torch.no_grad():
            self.embed_dim = int(self.model.encode_text(self.tokenize(["a"])["input_ids"]).shape[-1])
        size = self.preprocess_cfg["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.freeze()

    # ----------------------------------------------------------------------------- preprocessing
    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def preprocess_info(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.preprocess_cfg))  # tuples -> lists

    @property
    def pad_id(self) -> int:
        hf = getattr(self.tokenizer, "tokenizer", None)
        return int(getattr(hf, "pad_token_id", None) or 0)

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        ids = self.tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": f"open_clip:{type(self.tokenizer).__name__}", "model": self.model_name,
                "context_length": int(self.tokenizer.context_length), "pad_id": self.pad_id}

    # ----------------------------------------------------------------------------- encoders
    def _image_blocks(self) -> list[nn.Module]:
        v = self.model.visual
        if isinstance(v, VisionTransformer):
            return list(v.transformer.resblocks)
        if isinstance(v, ModifiedResNet):
            return [v.layer1, v.layer2, v.layer3, v.layer4]
        return []

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        blocks = self._image_blocks()
        layers = check_layers(layers, len(blocks), "image")
        v = self.model.visual
        watch = {f"image.{i}": blocks[i] for i in layers}
        if isinstance(v, ModifiedResNet):
            watch["tokens"] = v.layer4
        with OutputCapture(watch) as cap:
            out = v(pixels)
        tokens, grid = None, None
        if isinstance(v, VisionTransformer) and v.output_tokens:
            pooled, tokens = out
            grid = tuple(int(g) for g in v.grid_size)
        else:
            pooled = out
            if "tokens" in cap.outputs:
                tokens, grid = feature_map_tokens(cap.outputs["tokens"])
        inter = {}
        for i in layers:
            h = cap.outputs[f"image.{i}"]
            if h.dim() == 4:  # ResNet stage output [B, C, h, w]
                inter[f"image.{i}"] = h.mean(dim=(2, 3))
            else:
                h = h if v.transformer.batch_first else h.transpose(0, 1)
                inter[f"image.{i}"] = h[:, 1:].mean(dim=1)
        return ImageFeatures(l2_normalize(pooled), tokens, grid, inter)

    def _text_blocks(self) -> list[nn.Module]:
        tr = getattr(self._text, "transformer", None)
        return list(tr.resblocks) if hasattr(tr, "resblocks") else []

    @torch.no_grad()
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        ids = batch["input_ids"]
        mask = ids != self.pad_id
        blocks = self._text_blocks()
        layers = check_layers(layers, len(blocks), "text")
        watch = {f"text.{i}": blocks[i] for i in layers}
        if self.text_token_dim:
            watch["tokens"] = self._text.ln_final
        with OutputCapture(watch) as cap:
            embed = self.model.encode_text(ids)
        tokens = cap.outputs.get("tokens")
        if tokens is not None and tokens.dim() != 3:  # CoCa-style: ln_final applied to the pooled token only
            tokens = None
        inter = {}
        for i in layers:
            h = cap.outputs[f"text.{i}"]
            h = h if self._text.transformer.batch_first else h.transpose(0, 1)
            inter[f"text.{i}"] = masked_mean(h[:, : ids.shape[1]], mask)
        return TextFeatures(l2_normalize(embed), tokens[:, : ids.shape[1]] if tokens is not None else None,
                            mask if tokens is not None else None, inter)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def config(self) -> dict[str, Any]:
        bias = getattr(self.model, "logit_bias", None)
        return {**super().config(), "openclip": {
            "model": self.model_name, "pretrained": self.pretrained,
            "model_cfg": open_clip.get_model_config(self.model_name) if not self.model_name.startswith("local-dir:") else None,
            "logit_bias": float(bias.item()) if bias is not None else None}}

    # ----------------------------------------------------------------------------- pruning
    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        v = self.model.visual
        if not (isinstance(v, VisionTransformer) and v.output_tokens) or not self.text_token_dim:
            raise NotImplementedError(f"openclip: layer pruning needs a ViT image tower and a built-in text transformer "
                                      f"({self.model_name} has {type(v).__name__} / {type(self._text).__name__})")
        ki = check_prune_depth(image_layers, len(self._image_blocks()), "image")
        kt = check_prune_depth(text_layers, len(self._text_blocks()), "text")
        return PrunedTowers(
            image=OpenClipImagePrefix(v, ki), text=OpenClipTextPrefix(self._text, kt, self.pad_id),
            image_dim=self.image_token_dim, text_dim=self.text_token_dim,
            config={"teacher": self.spec, "image_layers": ki, "text_layers": kt})


def _truncated_copy(module: nn.Module, transformer: nn.Module, k: int) -> nn.Module:
    """Deep copy of ``module`` in which ``transformer`` (``module`` itself or a child of it) keeps
    only its first ``k`` residual blocks; the original is left untouched."""
    kept = transformer.resblocks
    transformer.resblocks = kept[:k]
    try:
        return copy.deepcopy(module)
    finally:
        transformer.resblocks = kept


class OpenClipImagePrefix(nn.Module):
    """Patch embedding + first k ViT blocks + ``ln_post``; pooled like the teacher (CLS or mean)."""

    def __init__(self, visual: VisionTransformer, k: int) -> None:
        super().__init__()
        self.visual = _truncated_copy(visual, visual.transformer, k)
        self.visual.proj = None
        self.visual.output_tokens = True
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.visual.requires_grad_(True)

    def prefix_modules(self, n: int) -> list[nn.Module]:
        """Patch embedding, ``ln_pre`` and the first ``n`` blocks (position/class embeddings are
        frozen with the patch embedding by :class:`students.pruned.PrunedStudent`)."""
        return [self.visual.conv1, self.visual.ln_pre, *self.visual.transformer.resblocks[:n]]

    def prefix_parameters(self) -> list[nn.Parameter]:
        return [self.visual.class_embedding, self.visual.positional_embedding]

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        pooled, tokens = self.visual(pixels)
        return pooled, tokens, self.grid


class OpenClipTextPrefix(nn.Module):
    """Token + positional embedding, first k text blocks and ``ln_final``; pooled like the teacher."""

    def __init__(self, text: nn.Module, k: int, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id
        if isinstance(text, TextTransformer):
            self.tower = _truncated_copy(text, text.transformer, k)
            self.tower.text_projection = None
            self.tower.output_tokens = True
        else:  # CLIP keeps its text tower inline on the model
            self.tower = None
            self.token_embedding = copy.deepcopy(text.token_embedding)
            self.positional_embedding = nn.Parameter(text.positional_embedding.detach().clone())
            mask = text.attn_mask
            self.register_buffer("attn_mask", mask.clone() if mask is not None else None, persistent=False)
            self.transformer = _truncated_copy(text.transformer, text.transformer, k)
            self.ln_final = copy.deepcopy(text.ln_final)
            self.pool_type, self.eos_id = text.text_pool_type, getattr(text, "text_eos_id", None)
        self.requires_grad_(True)

    def forward(self, batch: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
        ids = batch["input_ids"]
        mask = ids != self.pad_id
        if self.tower is not None:
            pooled, tokens = self.tower(ids)
            return pooled, tokens, mask
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        causal = self.attn_mask[: ids.shape[1], : ids.shape[1]] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=causal))
        return text_global_pool(x, ids, self.pool_type, self.eos_id), x, mask
