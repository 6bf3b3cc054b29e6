"""Parameter-efficient students tuned on top of a ``lit:`` teacher's frozen pretrained encoders.

Both students take the LiT teacher's towers (the ImageNet MobileNetV2 trunk and the MiniLM text
encoder), projections and logit scale, freeze the towers (``requires_grad=False``, kept in eval
mode so BatchNorm statistics never move) and add small trainable modules. Trainable: the new
modules, both projections and the logit scale. ``trainable_share()`` = trainable / all parameters.

``mwa`` — multiway adapters (after "MultiWay-Adapter: Adapting large-scale multi-modal models for
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

``pmf`` — deep-layer interactive prompting (after "Efficient Multimodal Fusion via Interactive
Prompting", Li et al., CVPR 2023), ``create_student("pmf", teacher="lit:DIR", prompt_layers=2)``.
In the paper, each of the last ``L_f`` layers of two frozen unimodal transformers runs twice: a
*query stage* ``layer_m([x_m; QCP_m; QP_m])`` whose query-prompt (QP) outputs pass a non-linear
mapper to the *other* modality, and a *fusion stage* ``layer_n([x_n; FCP_n; mapped QP_m])``; prompts
(QP, query-context prompts QCP, fusion-context prompts FCP) are new in every fusion layer and only
deep layers get them, so backpropagation stops at the first prompted layer (the memory saving).
A dual encoder must encode an image without its caption, so here the interaction is
*intra-modal*: the mapped QP outputs of a modality are fed back into the fusion stage of the same
modality and layer. Concretely:

* text: the last ``prompt_layers`` MiniLM layers run the query and fusion stages with per-layer
  QP/QCP/FCP tokens (prompt tokens are attended to by and attend to every real token); the shallow
  layers and embeddings run without autograd; pooling and tokens are those of the real tokens;
* image: the CNN has no token sequence, so the frozen trunk runs without autograd and
  ``prompt_layers`` small pre-LN transformer layers (width ``image_width``) over the last feature
  map's spatial tokens (linearly mapped from 1280 channels) run the same two stages. The image
  feature is ``GAP(feature map) + out(mean of the last query-stage QP outputs)`` (``out``
  zero-initialised, so the image side starts at the teacher's); the image ``tokens`` are the spatial
  tokens after the last fusion stage (width ``image_width``, on the feature map's grid).

No cross-modal information flows through the encoders; the modalities meet only in the losses.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize
from distill.core.registry import STUDENTS, TEACHERS, create_teacher
from distill.core.towers import feature_map_tokens, pool_text, tokenize_padded
from students.base import Student, TextBatch

# torchvision's residual "expand -> depthwise -> project" blocks (MobileNetV2/V3, EfficientNet)
RESIDUAL_BLOCKS = ("InvertedResidual", "MBConv", "FusedMBConv")


class _TunedStudent(Student):
    """Shared part: the teacher's frozen towers, trainable projections + logit scale."""

    name: str

    def __init__(self, teacher: str) -> None:
        super().__init__()
        t = create_teacher(teacher)
        if not isinstance(t, TEACHERS.get("lit")):
            raise ValueError(f"student {self.name!r} needs a lit: teacher (lit:<folder> or lit:default), "
                             f"got {teacher!r} ({type(t).__name__})")
        self.teacher_spec = teacher
        # The freshly built teacher is discarded, so its modules are taken over rather than copied.
        self.backbone, self.text_model = t.backbone, t.text_model
        self.backbone.requires_grad_(False)
        self.text_model.requires_grad_(False)
        self.image_proj, self.text_proj = t.image_proj.requires_grad_(True), t.text_proj.requires_grad_(True)
        self.logit_scale = nn.Parameter(t.log_logit_scale.detach().clone())
        self.embed_dim, self.image_size = t.embed_dim, t.image_size
        self.image_token_dim, self.text_token_dim = t.image_token_dim, t.text_token_dim
        self._pooling, self._max_length, self._tokenizer = t.cfg.pooling, t.cfg.max_length, t.tokenizer
        self._preprocess, self._tokenizer_info = t.preprocess_info(), t.tokenizer_info()
        self.mean, self.std = tuple(self._preprocess["mean"]), tuple(self._preprocess["std"])
        self._transform = t.image_transform()

    def train(self, mode: bool = True) -> "_TunedStudent":
        """Train mode for the new modules; the frozen towers always stay in eval mode."""
        super().train(mode)
        self.backbone.eval()
        self.text_model.eval()
        return self

    def image_transform(self, train: bool = False) -> Callable[[Image.Image], Tensor]:
        return self._transform

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        return tokenize_padded(self._tokenizer, texts, self._max_length)

    def preprocess_info(self) -> dict[str, Any]:
        return dict(self._preprocess)

    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self._tokenizer_info)

    def trainable_share(self) -> float:
        """Trainable parameters / all parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / self.num_params()

    def _pool_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return pool_text(hidden, mask, self._pooling)


# ------------------------------------------------------------------------------------------- mwa
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
class MultiwayAdapterStudent(_TunedStudent):
    """Frozen LiT towers + per-modality parallel adapters + a shared alignment enhancer."""

    name = "mwa"

    def __init__(self, teacher: str, text_adapter_width: int = 64, image_adapter_ratio: float = 0.25,
                 enhancer_width: int = 64) -> None:
        super().__init__(teacher)
        if text_adapter_width < 1 or enhancer_width < 1 or image_adapter_ratio <= 0:
            raise ValueError(f"mwa: adapter widths must be positive, got text_adapter_width={text_adapter_width}, "
                             f"image_adapter_ratio={image_adapter_ratio}, enhancer_width={enhancer_width}")
        self.text_adapter_width, self.image_adapter_ratio = text_adapter_width, image_adapter_ratio
        self.enhancer_width = enhancer_width
        if not isinstance(self.backbone, nn.Sequential):
            raise ValueError(f"mwa: the teacher's image backbone {type(self.backbone).__name__} is no block list")
        shapes = block_shapes(self.backbone, min(self.image_size, 64))
        adapted = 0
        for i, (block, (c_in, c_out, stride)) in enumerate(zip(list(self.backbone), shapes)):
            if type(block).__name__ in RESIDUAL_BLOCKS:
                width = max(1, math.ceil(image_adapter_ratio * c_out))
                self.backbone[i] = ParallelAdapted(block, ConvAdapter(c_in, c_out, width, stride))
                adapted += 1
        if not adapted:
            raise ValueError(f"mwa: the image backbone has no {'/'.join(RESIDUAL_BLOCKS)} block to adapt")
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


# ------------------------------------------------------------------------------------------- pmf
class PromptSet(nn.Module):
    """One fusion layer's query (QP), query-context (QCP) and fusion-context (FCP) prompts and the
    QP mapper (``Linear -> ReLU -> Linear`` at half width, as in PMF)."""

    def __init__(self, dim: int, num_query: int, num_query_context: int, num_fusion_context: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, num_query, dim) * 0.02)
        self.query_context = nn.Parameter(torch.randn(1, num_query_context, dim) * 0.02)
        self.fusion_context = nn.Parameter(torch.randn(1, num_fusion_context, dim) * 0.02)
        self.mapper = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim))

    def forward(self, layer: Callable[[Tensor, Tensor | None], Tensor], x: Tensor,
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Query stage then fusion stage of ``layer`` on ``x`` [B, N, C] (``mask`` [B, N] bool or
        None); returns (new x [B, N, C], query-stage QP outputs [B, num_query, C])."""
        b, n = x.shape[:2]
        nq = self.query.shape[1]
        query_in = torch.cat([x, self.query_context.expand(b, -1, -1), self.query.expand(b, -1, -1)], dim=1)
        q_out = layer(query_in, _extend_mask(mask, query_in.shape[1]))[:, -nq:]
        fusion_in = torch.cat([x, self.fusion_context.expand(b, -1, -1), self.mapper(q_out)], dim=1)
        return layer(fusion_in, _extend_mask(mask, fusion_in.shape[1]))[:, :n], q_out


def _extend_mask(mask: Tensor | None, length: int) -> Tensor | None:
    """Pad a [B, N] bool mask with True (prompts are always attended) to ``length``."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, L] bool keep-mask -> [B, 1, 1, L] additive attention mask."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None, None]


@STUDENTS.register("pmf")
class PromptFusionStudent(_TunedStudent):
    """Frozen LiT towers + PMF-style prompts in the deep layers (see the module docstring)."""

    name = "pmf"

    def __init__(self, teacher: str, prompt_layers: int = 2, num_query: int = 4, num_query_context: int = 4,
                 num_fusion_context: int = 4, image_width: int = 256, image_heads: int = 4) -> None:
        super().__init__(teacher)
        depth = len(self.text_model.encoder.layer)
        if not 1 <= prompt_layers <= depth:
            raise ValueError(f"pmf: prompt_layers must be in 1..{depth} (the text encoder's depth), got {prompt_layers}")
        if min(num_query, num_query_context, num_fusion_context) < 1:
            raise ValueError(f"pmf: prompt counts must be >= 1, got query={num_query}, "
                             f"query_context={num_query_context}, fusion_context={num_fusion_context}")
        if image_width % image_heads:
            raise ValueError(f"pmf: image_width {image_width} is not divisible by image_heads {image_heads}")
        self.prompt_layers, self.num_query = prompt_layers, num_query
        self.num_query_context, self.num_fusion_context = num_query_context, num_fusion_context
        self.image_width, self.image_heads = image_width, image_heads
        counts = (num_query, num_query_context, num_fusion_context)
        self.text_prompts = nn.ModuleList(PromptSet(self.text_token_dim, *counts) for _ in range(prompt_layers))
        self.image_in = nn.Linear(self.image_token_dim, image_width)
        self.image_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(image_width, image_heads, 2 * image_width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(prompt_layers))
        self.image_prompts = nn.ModuleList(PromptSet(image_width, *counts) for _ in range(prompt_layers))
        self.image_norm = nn.LayerNorm(image_width)
        self.image_out = nn.Linear(image_width, self.image_token_dim)
        nn.init.zeros_(self.image_out.weight)
        nn.init.zeros_(self.image_out.bias)
        self.image_token_dim = image_width  # the student's image tokens are the prompt layers' outputs

    def encode_image(self, pixels: Tensor) -> ImageFeatures:
        with torch.no_grad():
            fmap = self.backbone(pixels)
        tokens, grid = feature_map_tokens(fmap)
        x, q_out = self.image_in(tokens), None
        for layer, prompts in zip(self.image_layers, self.image_prompts):
            x, q_out = prompts(lambda h, _mask, layer=layer: layer(h), x, None)
        pooled = fmap.mean(dim=(2, 3)) + self.image_out(self.image_norm(q_out).mean(dim=1))
        return ImageFeatures(embed=l2_normalize(self.image_proj(pooled)), tokens=self.image_norm(x), grid=grid)

    def encode_text(self, batch: TextBatch) -> TextFeatures:
        mask = batch["attention_mask"].bool()
        layers = self.text_model.encoder.layer
        shallow = len(layers) - self.prompt_layers
        with torch.no_grad():
            x = self.text_model.embeddings(input_ids=batch["input_ids"])
            for layer in layers[:shallow]:
                x = _run_bert_layer(layer, x, mask)
        for layer, prompts in zip(layers[shallow:], self.text_prompts):
            x, _ = prompts(lambda h, m, layer=layer: _run_bert_layer(layer, h, m), x, mask)
        return TextFeatures(embed=l2_normalize(self.text_proj(self._pool_text(x, mask))), tokens=x, mask=mask)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher_spec, "prompt_layers": self.prompt_layers,
                "num_query": self.num_query, "num_query_context": self.num_query_context,
                "num_fusion_context": self.num_fusion_context, "image_width": self.image_width,
                "image_heads": self.image_heads}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The image token map-in and the last text mapper's output weight (both feed tokens and embeddings)."""
        return [self.image_in.weight, self.text_prompts[-1].mapper[-1].weight]


def _run_bert_layer(layer: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    out = layer(x, attention_mask=_additive_mask(mask, x.dtype))
    return out[0] if isinstance(out, tuple) else out
