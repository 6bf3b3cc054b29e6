"""``pmf`` — deep-layer interactive prompting (after "Efficient Multimodal Fusion via Interactive
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

The frozen towers, projections and logit scale come from :class:`students.tuned_base.TunedStudent`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures, l2_normalize
from distill.core.registry import STUDENTS
from distill.core.towers import feature_map_tokens
from students.base import TextBatch
from students.tuned_base import TunedStudent


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
class PromptFusionStudent(TunedStudent):
    """Frozen LiT towers + PMF-style prompts in the deep layers (see the module docstring)."""

    name = "pmf"

    def __init__(self, teacher: str, prompt_layers: int = 2, num_query: int = 4, num_query_context: int = 4,
                 num_fusion_context: int = 4, image_width: int = 256, image_heads: int = 4) -> None:
        super().__init__(teacher)
        depth = len(self.text_model.encoder.layer)
        if not 1 <= prompt_layers <= depth:
            raise ConfigError(f"pmf: prompt_layers must be in 1..{depth} (the text encoder's depth), got {prompt_layers}")
        if min(num_query, num_query_context, num_fusion_context) < 1:
            raise ConfigError(f"pmf: prompt counts must be >= 1, got query={num_query}, "
                             f"query_context={num_query_context}, fusion_context={num_fusion_context}")
        if image_width % image_heads:
            raise ConfigError(f"pmf: image_width {image_width} is not divisible by image_heads {image_heads}")
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
