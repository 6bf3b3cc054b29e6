"""The ``vit`` student: a CLIP-style ViT image tower + small causal text transformer.

Internally it *is* an ``open_clip.CLIP`` (``self.clip``), so :func:`distill.pipeline.export.main.export_open_clip`
is a lossless copy of config and weights. The student only adds access to the patch tokens, the
per-token text features and pooled intermediate-layer features.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch
from open_clip import CLIP
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image
from torch import Tensor, nn

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from distill.core.errors import ConfigError, UnknownNameError
from distill.core.registry import STUDENTS
from students.base import Student, TextBatch
from students.tokenizers import CLIP_PAD_ID, CLIP_VOCAB_SIZE, clip_tokenize


@dataclass(frozen=True)
class ViTDualConfig:
    """Architecture of the ``vit`` student (defaults: ViT-S/16 at 224 px + 6-layer text tower)."""

    embed_dim: int = 256
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 384
    vision_layers: int = 12
    vision_heads: int = 6
    text_width: int = 256
    text_layers: int = 6
    text_heads: int = 4
    context_length: int = 77
    vocab_size: int = CLIP_VOCAB_SIZE
    mlp_ratio: float = 4.0
    causal_text: bool = True
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for width, heads, tower in ((self.vision_width, self.vision_heads, "vision"),
                                    (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ConfigError(f"{tower}_width={width} is not divisible by {tower}_heads={heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


#: The named ``vit`` architectures, the one source of them (the ``cpu``/``gpu`` config presets name one
#: with ``student: {name: vit, preset: ...}``). A name reads ``vit-<ti|s|b><patch>[-<image px>]
#: [-d<vision layers>][-t<text width>]``: what it leaves out is the ViTDualConfig default (224 px, 12
#: vision layers) or the size's own text tower (tests/test_students.py checks every name).
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit-s16": {},
    # the gpu preset: ViT-S/16 at 224 px with a 384-wide, 6-head text tower
    "vit-s16-t384": {"text_width": 384, "text_heads": 6},
    "vit-ti16": {"vision_width": 192, "vision_heads": 3},
    # CPU-friendly: ViT-Ti/16 at 128 px (8x8 grid), 4-layer text tower, 32 tokens.
    "vit-ti16-128": {"vision_width": 192, "vision_heads": 3, "image_size": 128,
                     "text_layers": 4, "context_length": 32},
    # the cpu preset: vit-ti16-128 with 6 vision layers
    "vit-ti16-128-d6": {"vision_width": 192, "vision_heads": 3, "image_size": 128, "vision_layers": 6,
                        "text_layers": 4, "context_length": 32},
    "vit-b16": {"embed_dim": 512, "vision_width": 768, "vision_heads": 12,
                "text_width": 512, "text_heads": 8, "text_layers": 12},
}


@STUDENTS.register("vit")
class ViTDualStudent(Student):
    """Image-level dual encoder backed by an ``open_clip.CLIP`` model.

    ``create_student("vit", preset="vit-ti16-128", embed_dim=512)``: a preset of :data:`VIT_PRESETS`
    (default ``vit-s16``) with field overrides; or ``ViTDualStudent(ViTDualConfig(...))``."""

    name = "vit"

    #: the options besides ``preset`` (its ``**overrides``): the fields of :class:`ViTDualConfig`
    extra_options = tuple(f.name for f in fields(ViTDualConfig))

    def __init__(self, cfg: ViTDualConfig | None = None, /, *, preset: str | None = None, **overrides: Any) -> None:
        if cfg is None:
            cfg = self.resolve_config(preset, overrides)
        elif preset is not None or overrides:
            raise ConfigError("ViTDualStudent: give either a ViTDualConfig or a preset with overrides, not both")
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.image_token_dim = cfg.vision_width
        self.text_token_dim = cfg.text_width
        self.image_size = cfg.image_size
        self.mean, self.std = cfg.mean, cfg.std
        self.grid = (cfg.image_size // cfg.patch_size,) * 2
        self.clip = CLIP(**self.open_clip_model_cfg())
        self.clip.set_grad_checkpointing(cfg.grad_checkpointing)

    @staticmethod
    def resolve_config(preset: str | None, overrides: dict[str, Any]) -> ViTDualConfig:
        """The architecture of ``preset`` (:data:`VIT_PRESETS`, default ``vit-s16``) with field ``overrides``."""
        if preset is not None and preset not in VIT_PRESETS:
            raise UnknownNameError(f"preset: unknown vit preset {preset!r}; known: {', '.join(VIT_PRESETS)}")
        known = {f.name for f in fields(ViTDualConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown option of student 'vit'; known: preset, {', '.join(sorted(known))}")
        try:
            return ViTDualConfig(**{**VIT_PRESETS.get(preset or "vit-s16", {}), **overrides})
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"options {overrides}: {e}") from e

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """The architecture resolves (a known preset, widths divisible by heads, ...): checked
        when the config is read, before anything is built."""
        options = dict(options)
        cls.resolve_config(options.pop("preset", None), options)

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.clip.logit_scale

    # ---- open_clip description (used by the constructor and by the exporter) ----
    def open_clip_model_cfg(self) -> dict[str, Any]:
        """``model_cfg`` of an ``open_clip_config.json`` that rebuilds exactly ``self.clip``."""
        c = self.cfg
        return {
            "embed_dim": c.embed_dim,
            "quick_gelu": False,
            "vision_cfg": {"image_size": c.image_size, "patch_size": c.patch_size, "width": c.vision_width,
                           "layers": c.vision_layers, "head_width": c.vision_width // c.vision_heads,
                           "mlp_ratio": c.mlp_ratio},
            "text_cfg": {"context_length": c.context_length, "vocab_size": c.vocab_size, "width": c.text_width,
                         "heads": c.text_heads, "layers": c.text_layers, "mlp_ratio": c.mlp_ratio,
                         "no_causal_mask": not c.causal_text},
        }

    def open_clip_preprocess_cfg(self) -> dict[str, Any]:
        """``preprocess_cfg`` matching :meth:`image_transform`."""
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": "bicubic", "resize_mode": "shortest"}

    # ---- Student API ----
    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        """open_clip's eval transform (bicubic shortest-side resize, centre crop, normalise)."""
        return image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std,
                               interpolation="bicubic", resize_mode="shortest")

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return clip_tokenize(texts, self.cfg.context_length)

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": "open_clip.SimpleTokenizer", "context_length": self.cfg.context_length,
                "vocab_size": self.cfg.vocab_size, "pad_id": CLIP_PAD_ID}

    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        """Embedding from the CLS token; ``tokens`` are the patch tokens after ``ln_post``.
        ``layers`` adds ``intermediates["image.<i>"]``: the residual stream after block i,
        mean-pooled over patch tokens (the teachers' convention)."""
        pooled, tokens, inter = self._image_stream(pixels, layers)
        return ImageFeatures(embed=l2_normalize(pooled @ self.clip.visual.proj), tokens=tokens,
                             grid=(pixels.shape[-2] // self.clip.visual.patch_size[0],
                                   pixels.shape[-1] // self.clip.visual.patch_size[1]),
                             intermediates={f"image.{i}": y[:, 1:].mean(dim=1) for i, y in inter.items()})

    def _image_stream(self, pixels: Tensor, layers: Sequence[int] = ()) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """(pooled CLS feature before the projection, patch tokens, residual streams of ``layers``)."""
        visual = self.clip.visual
        x, inter = self._blocks(visual.transformer, visual._embeds(pixels), None, layers)
        pooled, tokens = visual._pool(x)
        return pooled, tokens, inter

    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        """CLIP text encoding pooled at the EOT token (highest id). Ids may be shorter than the
        context length (e.g. trimmed padding). ``layers`` adds ``intermediates["text.<i>"]``: the
        residual stream after layer i, mean-pooled over real tokens."""
        pooled, tokens, mask, inter = self._text_stream(batch, layers)
        return TextFeatures(embed=l2_normalize(pooled @ self.clip.text_projection), tokens=tokens, mask=mask,
                            intermediates={f"text.{i}": masked_mean(y, mask) for i, y in inter.items()})

    def _text_stream(self, batch: TextBatch, layers: Sequence[int] = ()
                     ) -> tuple[Tensor, Tensor, Tensor, dict[int, Tensor]]:
        """(EOT feature before the projection, tokens after ``ln_final``, mask, streams of ``layers``)."""
        ids = batch["input_ids"]
        length = ids.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"text batch has {length} tokens, more than context_length={self.cfg.context_length}")
        clip = self.clip
        x = clip.token_embedding(ids).to(clip.transformer.get_cast_dtype())
        x = x + clip.positional_embedding[:length].to(x.dtype)
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x, inter = self._blocks(clip.transformer, x, attn_mask, layers)
        tokens = clip.ln_final(x)
        eot, mask = ids.argmax(dim=-1), ids != CLIP_PAD_ID
        rows = torch.arange(ids.shape[0], device=ids.device)
        return tokens[rows, eot], tokens, mask, inter

    def projection_heads(self) -> dict[str, tuple[Callable[[Any], Tensor], Tensor]]:
        return {"image": (lambda pixels: self._image_stream(pixels)[0], self.clip.visual.proj.T),
                "text": (lambda batch: self._text_stream(batch)[0], self.clip.text_projection.T)}

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["mean"], out["std"] = list(self.cfg.mean), list(self.cfg.std)
        return {"name": self.name, **out}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last MLP output weight of each tower: every loss (embedding or token) flows through it."""
        return [self.clip.visual.transformer.resblocks[-1].mlp.c_proj.weight,
                self.clip.transformer.resblocks[-1].mlp.c_proj.weight]

    @staticmethod
    def _blocks(transformer: nn.Module, x: Tensor, attn_mask: Tensor | None,
                layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Run all residual blocks; also return the outputs of ``layers`` (0-based, negative counts
        from the end) keyed by block index. Gradient checkpointing is honoured by open_clip."""
        if not layers:
            return transformer(x, attn_mask=attn_mask), {}
        n = len(transformer.resblocks)
        if any(not -n <= i < n for i in layers):
            raise IndexError(f"layers {list(layers)} out of range for a {n}-block tower")
        take = sorted({i % n for i in layers})
        x, inter = transformer.forward_intermediates(x, attn_mask=attn_mask, indices=take)
        return x, dict(zip(take, inter))
