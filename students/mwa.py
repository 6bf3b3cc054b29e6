"""``mwa`` — multiway adapters (after "MultiWay-Adapter: Adapting large-scale multi-modal models for
scalable image-text retrieval", Long et al. 2023), ``create_student("mwa", teacher="lit:DIR")``:

* text: a bottleneck adapter (``down -> GELU -> up``, width ``text_adapter_width``) parallel to the
  FFN of every MiniLM layer: ``LN(FFN(h) + h + adapter(h))`` with ``h`` the attention output;
* image: the CNN analogue — a 1x1-conv bottleneck (``avgpool(stride) -> 1x1 conv -> GELU -> 1x1
  conv``, width ``ceil(image_adapter_ratio * C_out)``) parallel to every inverted-residual block,
  ``block(x) + adapter(x)``: an inverted-residual block is MobileNetV2's unit of "expand, mix,
  project" that plays the role the FFN plays in a transformer layer;
* a shared "alignment enhancer": one residual MLP block (``LN -> Linear -> GELU -> Linear``) whose
  weights are shared by both modalities. The pooled widths differ (1280 image, 384 text), so it
  acts in the shared embedding space, after the projections and before L2 normalisation.

Every ``up`` / output layer is zero-initialised, so an untrained ``mwa`` reproduces the teacher's
embeddings exactly. Differences from the paper: its backbone is a BEiT-3 multiway transformer
(shared attention, per-modality FFN experts) where adapters sit beside each modality expert; here
the towers are separate (a CNN and a BERT) and the enhancer is a single block on the embeddings.

The frozen towers, projections and logit scale come from :class:`students.tuned_base.TunedStudent`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures, l2_normalize
from distill.core.registry import STUDENTS
from distill.core.towers import feature_map_tokens
from students.base import TextBatch
from students.tuned_base import TunedStudent

# torchvision's residual "expand -> depthwise -> project" blocks (MobileNetV2/V3, EfficientNet)
RESIDUAL_BLOCKS = ("InvertedResidual", "MBConv", "FusedMBConv")


class TokenAdapter(nn.Module):
    """``down -> GELU -> up`` on the last dimension; ``up`` starts at zero."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


class ConvAdapter(nn.Module):
    """``avgpool(stride) -> 1x1 conv -> GELU -> 1x1 conv`` mapping a block's input to its output shape."""

    def __init__(self, c_in: int, c_out: int, width: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity()  # ceil = conv padding
        self.down, self.act = nn.Conv2d(c_in, width, 1), nn.GELU()
        self.up = nn.Conv2d(width, c_out, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(self.pool(x))))


class ParallelAdapted(nn.Module):
    """``block(x) + adapter(x)``."""

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + self.adapter(x)


class AdaptedFFNOutput(nn.Module):
    """A BERT layer's FFN output ``LN(dropout(dense(u)) + h)`` with ``+ adapter(h)`` added beside the FFN."""

    def __init__(self, output: nn.Module, adapter: TokenAdapter) -> None:
        super().__init__()
        self.output, self.adapter = output, adapter

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        o = self.output
        return o.LayerNorm(o.dropout(o.dense(hidden_states)) + input_tensor + self.adapter(input_tensor))


class AlignmentEnhancer(nn.Module):
    """Residual ``LN -> Linear -> GELU -> Linear`` block shared by both modalities; output starts at zero."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), TokenAdapter(dim, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def block_shapes(blocks: nn.Sequential, image_size: int) -> list[tuple[int, int, int]]:
    """(input channels, output channels, spatial stride) of every block, from a dummy forward."""
    shapes = []
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        for block in blocks:
            y = block.eval()(x)
            shapes.append((x.shape[1], y.shape[1], max(1, round(x.shape[-1] / y.shape[-1]))))
            x = y
    return shapes


@STUDENTS.register("mwa")
class MultiwayAdapterStudent(TunedStudent):
    """Frozen LiT towers + per-modality parallel adapters + a shared alignment enhancer."""

    name = "mwa"

    def __init__(self, teacher: str, text_adapter_width: int = 64, image_adapter_ratio: float = 0.25,
                 enhancer_width: int = 64) -> None:
        super().__init__(teacher)
        if text_adapter_width < 1 or enhancer_width < 1 or image_adapter_ratio <= 0:
            raise ConfigError(f"mwa: adapter widths must be positive, got text_adapter_width={text_adapter_width}, "
                             f"image_adapter_ratio={image_adapter_ratio}, enhancer_width={enhancer_width}")
        self.text_adapter_width, self.image_adapter_ratio = text_adapter_width, image_adapter_ratio
        self.enhancer_width = enhancer_width
        if not isinstance(self.backbone, nn.Sequential):
            raise ConfigError(f"mwa: the teacher's image backbone {type(self.backbone).__name__} is no block list")
        shapes = block_shapes(self.backbone, min(self.image_size, 64))
        adapted = 0
        for i, (block, (c_in, c_out, stride)) in enumerate(zip(list(self.backbone), shapes)):
            if type(block).__name__ in RESIDUAL_BLOCKS:
                width = max(1, math.ceil(image_adapter_ratio * c_out))
                self.backbone[i] = ParallelAdapted(block, ConvAdapter(c_in, c_out, width, stride))
                adapted += 1
        if not adapted:
            raise ConfigError(f"mwa: the image backbone has no {'/'.join(RESIDUAL_BLOCKS)} block to adapt")
        for layer in self.text_model.encoder.layer:
            layer.output = AdaptedFFNOutput(layer.output, TokenAdapter(self.text_token_dim, text_adapter_width))
        self.enhancer = AlignmentEnhancer(self.embed_dim, enhancer_width)

    def encode_image(self, pixels: Tensor) -> ImageFeatures:
        fmap = self.backbone(pixels)
        tokens, grid = feature_map_tokens(fmap)
        return ImageFeatures(embed=l2_normalize(self.enhancer(self.image_proj(fmap.mean(dim=(2, 3))))),
                             tokens=tokens, grid=grid)

    def encode_text(self, batch: TextBatch) -> TextFeatures:
        mask = batch["attention_mask"]
        hidden = self.text_model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        pooled = self._pool_text(hidden, mask.bool())
        return TextFeatures(embed=l2_normalize(self.enhancer(self.text_proj(pooled))), tokens=hidden, mask=mask.bool())

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher_spec, "text_adapter_width": self.text_adapter_width,
                "image_adapter_ratio": self.image_adapter_ratio, "enhancer_width": self.enhancer_width}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The ``up`` weight of the last image and last text adapter (they feed tokens and embeddings)."""
        image = [m for m in self.backbone if isinstance(m, ParallelAdapted)][-1].adapter.up.weight
        return [image, self.text_model.encoder.layer[-1].output.adapter.up.weight]
