"""``ensemble:SPEC1+SPEC2[+...]`` / ``ensemble:<members.yaml>`` — several frozen teachers as one.

Distilling from more than one teacher (MobileCLIP distils from two CLIP models) with the usual
pipeline: every member encodes the same images and captions, and the ensemble's embedding is the
concatenation of the members' L2-normalised embeddings, member ``i`` scaled by ``sqrt(w_i)`` (the
weights normalised to sum 1), so it has unit norm and **the ensemble's cosine similarity between an
image and a caption is the weighted mean of the members' cosine similarities**. ``embed_dim`` is the
sum of the members' widths. Inline members get equal weights; a YAML (or JSON) file gives weights::

    members:                 # or a bare list
      - spec: lit:runs/teacher_mnv2
        weight: 1.0
      - lit:runs/teacher_effnet   # weight 1

Everything that is not an embedding comes from the **first member**: image/text tokens, grid, mask,
intermediates (``layers`` index the first member's blocks), ``image_size`` and ``pruned_towers``
(a pruned student from an ensemble starts from the first member's blocks). The logit scale is the
mean of the members' logit scales.

Tokenisation: each member tokenises with its own tokenizer; the batch holds the first member's
tensors under their usual keys (``input_ids``, ``attention_mask``) and member ``i >= 1``'s under
``m<i>.<key>``.

Image preprocessing: when all members report the same :meth:`~Teacher.preprocess_info`, the
ensemble uses the first member's transform and feeds its pixels to every member. Otherwise the
ensemble's transform is resize (shorter side) + centre crop to the first member's size, as
unnormalised [0, 1] pixels, and each member gets them bilinearly resized (antialiased) to its own
``image_size`` and normalised with its own ``mean``/``std``. That is exact for members whose own
transform is "resize shorter side, centre crop, normalise" at the first member's size (LiT, CLIP);
a member with another size sees a second resize, and one with other preprocessing (e.g. no crop)
sees only an approximation of its own input. Members whose ``preprocess_info()`` has no
``mean``/``std`` can only join when their preprocessing equals the others'.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from distill.core.errors import ConfigError
from distill.core.features import ImageFeatures, TextFeatures, l2_normalize
from distill.core.registry import TEACHERS, check_teacher_spec, create_teacher
from teachers.base import PrunedTowers, Teacher, TextBatch


def parse_members(rest: str) -> list[tuple[str, float]]:
    """``SPEC1+SPEC2+...`` (equal weights) or a ``.yaml``/``.yml``/``.json`` file listing members
    (strings or ``{spec, weight}``) -> [(spec, weight)] with weights normalised to sum 1."""
    if not rest:
        raise ConfigError("ensemble spec needs members: ensemble:SPEC1+SPEC2[+...] or ensemble:<members.yaml>")
    if rest.lower().endswith((".yaml", ".yml", ".json")):
        path = Path(rest).expanduser()
        if not path.is_file():
            raise ConfigError(f"ensemble: members file not found: {path}")
        data = yaml.safe_load(path.read_text())
        entries = data.get("members") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ConfigError(f"ensemble: {path} must hold a list of members (or a 'members' list)")
        members = []
        for n, e in enumerate(entries):
            if isinstance(e, str):
                members.append((e, 1.0))
            elif isinstance(e, dict) and isinstance(e.get("spec"), str) and set(e) <= {"spec", "weight"}:
                try:
                    members.append((e["spec"], float(e.get("weight", 1.0))))
                except (TypeError, ValueError):
                    raise ConfigError(f"ensemble: {path}: members[{n}].weight must be a number, not {e['weight']!r}") from None
            else:
                raise ConfigError(f"ensemble: {path}: members[{n}] must be a spec string or {{spec, weight}}, not {e!r}")
        where = str(path)
    else:
        members, where = [(s, 1.0) for s in rest.split("+")], f"ensemble:{rest}"
    if not members:
        raise ConfigError(f"ensemble: {where} lists no members")
    for spec, w in members:
        if not spec or ":" not in spec:
            raise ConfigError(f"ensemble: {where}: member {spec!r} is not a teacher spec '<backend>:<args>'")
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"ensemble: {where}: member {spec!r} has weight {w}; weights must be > 0")
    total = sum(w for _, w in members)
    return [(s, w / total) for s, w in members]


@TEACHERS.register("ensemble")
class EnsembleTeacher(Teacher):
    """Frozen teachers combined as described in the module docstring."""

    @classmethod
    def from_spec(cls, rest: str) -> "EnsembleTeacher":
        """Build from the spec after ``ensemble:``: ``rest`` is ``SPEC1+SPEC2[+...]`` or a members file."""
        members = parse_members(rest)
        return cls([create_teacher(spec) for spec, _ in members], [w for _, w in members])

    @classmethod
    def check_spec(cls, rest: str) -> None:
        """Every member spec names a registered backend (nothing is built)."""
        for spec, _ in parse_members(rest):
            try:
                check_teacher_spec(spec)
            except ConfigError as e:
                raise type(e)(f"ensemble member {spec!r}: {e}") from e

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float]) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ConfigError("ensemble: needs one weight per member and at least one member")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        first = members[0]
        self.spec = "ensemble:" + "+".join(m.spec for m in members)
        self.embed_dim = sum(m.embed_dim for m in members)
        self.image_token_dim, self.text_token_dim = first.image_token_dim, first.text_token_dim
        self.image_size = first.image_size
        infos = [m.preprocess_info() for m in members]
        self.shared_pixels = all(i == infos[0] for i in infos[1:])
        if not self.shared_pixels:
            bad = [m.spec for m, i in zip(members, infos) if not (i.get("mean") and i.get("std"))]
            if bad:
                raise ConfigError(f"ensemble: members preprocess images differently and {bad} report no mean/std in "
                                  "preprocess_info(), so the ensemble cannot feed them one shared image")
            for k, (m, i) in enumerate(zip(members, infos)):
                self.register_buffer(f"_mean{k}", torch.tensor(i["mean"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
                self.register_buffer(f"_std{k}", torch.tensor(i["std"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.freeze()

    # ----------------------------------------------------------------------------- preprocessing
    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        if self.shared_pixels:
            return self.members[0].image_transform()
        s = self.image_size
        return T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(s), T.ToTensor()])

    def preprocess_info(self) -> dict[str, Any]:
        infos = [m.preprocess_info() for m in self.members]
        if self.shared_pixels:
            return {**infos[0], "members": infos}
        return {"size": self.image_size, "resize": "bilinear-shortest", "crop": "center", "mean": [0.0, 0.0, 0.0],
                "std": [1.0, 1.0, 1.0], "members": infos}

    def member_pixels(self, k: int, pixels: Tensor) -> Tensor:
        """The ensemble's pixels as member ``k`` expects them."""
        if self.shared_pixels:
            return pixels
        size = self.members[k].image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (pixels - getattr(self, f"_mean{k}")) / getattr(self, f"_std{k}")

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        batch = dict(self.members[0].tokenize(texts))
        for k, m in enumerate(self.members[1:], start=1):
            batch.update({f"m{k}.{key}": v for key, v in m.tokenize(texts).items()})
        return batch

    @staticmethod
    def member_batch(k: int, batch: TextBatch) -> TextBatch:
        """Member ``k``'s part of an ensemble text batch."""
        if k == 0:
            return {key: v for key, v in batch.items() if not re.match(r"m\d+\.", key)}
        prefix = f"m{k}."
        return {key[len(prefix):]: v for key, v in batch.items() if key.startswith(prefix)}

    def tokenizer_info(self) -> dict[str, Any]:
        infos = [m.tokenizer_info() for m in self.members]
        return {**infos[0], "members": infos}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "ensemble": [{"spec": m.spec, "weight": w} for m, w in zip(self.members, self.weights)]}

    # ----------------------------------------------------------------------------- encoders
    def _combine(self, embeds: list[Tensor]) -> Tensor:
        return l2_normalize(torch.cat([math.sqrt(w) * l2_normalize(e.float()) for e, w in zip(embeds, self.weights)], -1))

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        first = self.members[0].encode_image(self.member_pixels(0, pixels), layers)
        rest = [m.encode_image(self.member_pixels(k, pixels)).embed for k, m in enumerate(self.members) if k]
        return ImageFeatures(self._combine([first.embed, *rest]), first.tokens, first.grid, first.intermediates)

    @torch.no_grad()
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        first = self.members[0].encode_text(self.member_batch(0, batch), layers)
        rest = [m.encode_text(self.member_batch(k, batch)).embed for k, m in enumerate(self.members) if k]
        return TextFeatures(self._combine([first.embed, *rest]), first.tokens, first.mask, first.intermediates)

    @property
    def logit_scale(self) -> float:
        return sum(m.logit_scale for m in self.members) / len(self.members)

    def pruned_towers(self, image_layers: int, text_layers: int) -> PrunedTowers:
        """The first member's pruned towers (fed the ensemble's pixels and the first member's tokens)."""
        towers = self.members[0].pruned_towers(image_layers, text_layers)
        image = towers.image if self.shared_pixels else _Normalized(towers.image, self._mean0, self._std0)
        return PrunedTowers(image=image, text=towers.text, image_dim=towers.image_dim, text_dim=towers.text_dim,
                            config={**towers.config, "teacher": self.spec, "member": self.members[0].spec})


class _Normalized(nn.Module):
    """Normalise [0, 1] pixels with the first member's mean/std before its pruned image tower."""

    def __init__(self, tower: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def prefix_modules(self, n: int) -> list[nn.Module]:
        return self.tower.prefix_modules(n)

    def forward(self, pixels: Tensor):
        return self.tower((pixels - self.mean) / self.std)



__all__ = ["EnsembleTeacher", "parse_members"]
