"""``mllm:<local folder>`` — a vision-language LM used as an embedder (E5-V / VLM2Vec style).

The folder holds a transformers image-text-to-text model (e.g. ``LlavaForConditionalGeneration``)
with its processor (tokenizer + image processor), loaded with ``local_files_only=True``. An image is
embedded by running the prompt ``image_prompt`` (containing the processor's image token) and a
caption by ``text_prompt`` with ``<sent>`` replaced by the caption; the embedding is the final
hidden state of the last token (``pooling: "last"``, default) or the mean over the prompt
(``"mean"``), L2-normalised. Optional ``mllm.json`` in the folder overrides :class:`MLLMConfig`.

Tokens: final hidden states at the image-token positions ([B, N, C], a square grid when N is a
square) and at the caption's own positions (mask = caption tokens, prompt excluded; the batch
carries it as ``text_mask``). Intermediates ``image.<i>`` / ``text.<i>``: the LM hidden state after
decoder layer ``i``, pooled like the embedding. Captions are padded (right) to a fixed length.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoModelForImageTextToText, AutoProcessor

from distill.core.features import ImageFeatures, TextFeatures, l2_normalize, masked_mean
from distill.core.errors import ConfigError
from distill.core.registry import TEACHERS
from teachers.base import Teacher, TextBatch
from teachers.common import check_layers, require_dir

CONFIG_FILE = "mllm.json"
SENT = "<sent>"


@dataclass
class MLLMConfig:
    """Prompting and pooling of an MLLM embedder (``mllm.json``)."""

    image_prompt: str = "<image>\nSummarize above image in one word:"
    text_prompt: str = "<sent>\nSummarize above sentence in one word:"
    pooling: str = "last"  # "last" token or "mean" over the prompt
    max_text_tokens: int = 48  # caption tokens kept (longer captions are truncated)
    logit_scale: float = 50.0  # VLM2Vec uses temperature 0.02
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "mean"):
            raise ConfigError(f"mllm: pooling must be 'last' or 'mean', not {self.pooling!r}")
        if SENT not in self.text_prompt:
            raise ConfigError(f"mllm: text_prompt must contain {SENT!r}: {self.text_prompt!r}")

    @classmethod
    def from_folder(cls, folder: Path) -> "MLLMConfig":
        path = folder / CONFIG_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ConfigError(f"mllm: {path}: unknown keys {sorted(set(data) - known)}; known: {sorted(known)}")
        return cls(**data)


@TEACHERS.register("mllm")
class MLLMTeacher(Teacher):
    """A VLM (Llava-style) prompted to summarise an image or a sentence into its last hidden state."""

    @classmethod
    def from_spec(cls, rest: str) -> "MLLMTeacher":
        """Build from the spec after ``mllm:``: ``rest`` is a local folder."""
        if not rest:
            raise ConfigError("mllm spec needs a folder: mllm:<local folder>")
        return cls(rest)

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = require_dir(folder, "mllm", "expected a folder with a saved image-text-to-text model + processor")
        self.spec = f"mllm:{folder}"
        self.cfg = MLLMConfig.from_folder(self.folder)
        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(self.folder, local_files_only=True,
                                                                 dtype=getattr(torch, self.cfg.dtype))
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", "<image>")
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        if self.image_token not in self.cfg.image_prompt:
            raise ConfigError(f"mllm: image_prompt must contain the image token {self.image_token!r}: "
                             f"{self.cfg.image_prompt!r}")
        text_cfg = self.model.config.get_text_config()
        self.embed_dim = self.image_token_dim = self.text_token_dim = int(text_cfg.hidden_size)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.image_size = self._processor_size()
        self._image_ids = self._image_prompt_ids()
        n = int((self._image_ids == self.image_token_id).sum())
        side = math.isqrt(n)
        self.grid = (side, side) if side * side == n else None
        template = self.tokenizer(self.cfg.text_prompt.replace(SENT, ""))["input_ids"]
        self.context_length = len(template) + self.cfg.max_text_tokens + 2  # +2: merges at the caption edges
        self.freeze()

    # ----------------------------------------------------------------------------- preprocessing
    def _processor_size(self) -> int:
        p = self.processor.image_processor
        for attr in ("crop_size", "size"):
            s = getattr(p, attr, None)
            if s:
                s = dict(s)
                return int(s.get("height") or s.get("shortest_edge"))
        return int(self.model.config.vision_config.image_size)

    def _image_prompt_ids(self) -> Tensor:
        """Prompt ids with the image token expanded to the number of visual tokens."""
        dummy = Image.new("RGB", (self.image_size, self.image_size))
        return self.processor(text=[self.cfg.image_prompt], images=[dummy], return_tensors="pt")["input_ids"][0]

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        image_processor = self.processor.image_processor

        def transform(image: Image.Image) -> Tensor:
            return image_processor(images=image, return_tensors="pt")["pixel_values"][0]

        return transform

    def preprocess_info(self) -> dict[str, Any]:
        p = self.processor.image_processor
        return {"processor": type(p).__name__, "size": self.image_size,
                "mean": list(getattr(p, "image_mean", []) or []), "std": list(getattr(p, "image_std", []) or []),
                "image_prompt": self.cfg.image_prompt, "visual_tokens": int((self._image_ids == self.image_token_id).sum())}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        """Prompt-wrapped captions, right-padded to ``context_length``; ``text_mask`` marks caption tokens."""
        b = len(texts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, self.context_length), pad, dtype=torch.long)
        attn = torch.zeros(b, self.context_length, dtype=torch.long)
        text_mask = torch.zeros(b, self.context_length, dtype=torch.long)
        start = self.cfg.text_prompt.index(SENT)
        for row, caption in enumerate(texts):
            caption = self._truncate(caption)
            prompt = self.cfg.text_prompt.replace(SENT, caption)
            enc = self.tokenizer(prompt, return_offsets_mapping=True)
            tok_ids, offsets = enc["input_ids"][: self.context_length], enc["offset_mapping"][: self.context_length]
            ids[row, : len(tok_ids)] = torch.tensor(tok_ids)
            attn[row, : len(tok_ids)] = 1
            for j, (a, z) in enumerate(offsets):
                text_mask[row, j] = int(z > a and a < start + len(caption) and z > start)
        return {"input_ids": ids, "attention_mask": attn, "text_mask": text_mask}

    def _truncate(self, caption: str) -> str:
        enc = self.tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= self.cfg.max_text_tokens:
            return caption
        return caption[: enc["offset_mapping"][self.cfg.max_text_tokens - 1][1]]

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": type(self.tokenizer).__name__, "path": str(self.folder), "context_length": self.context_length,
                "pad_id": self.tokenizer.pad_token_id, "text_prompt": self.cfg.text_prompt,
                "max_text_tokens": self.cfg.max_text_tokens, "pooling": self.cfg.pooling}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "mllm": {"architecture": type(self.model).__name__, **asdict(self.cfg)}}

    # ----------------------------------------------------------------------------- encoders
    def _pool(self, hidden: Tensor, attn: Tensor) -> Tensor:
        if self.cfg.pooling == "mean":
            return masked_mean(hidden, attn.bool())
        last = attn.long().cumsum(dim=1).argmax(dim=1)  # index of the last non-padding position
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def _run(self, ids: Tensor, attn: Tensor, layers: list[int], pixels: Tensor | None = None):
        kwargs = {"pixel_values": pixels.to(self.model.dtype)} if pixels is not None else {}
        return self.model.model(input_ids=ids, attention_mask=attn, output_hidden_states=bool(layers), **kwargs)

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, layers: Sequence[int] = ()) -> ImageFeatures:
        layers = check_layers(layers, self.num_layers, "image")
        ids = self._image_ids.to(pixels.device).unsqueeze(0).expand(len(pixels), -1)
        attn = torch.ones_like(ids)
        out = self._run(ids, attn, layers, pixels)
        hidden = out.last_hidden_state
        is_image = ids[0] == self.image_token_id
        inter = {f"image.{i}": self._pool(out.hidden_states[i + 1], attn) for i in layers}
        return ImageFeatures(l2_normalize(self._pool(hidden, attn)), hidden[:, is_image], self.grid, inter)

    @torch.no_grad()
    def encode_text(self, batch: TextBatch, layers: Sequence[int] = ()) -> TextFeatures:
        layers = check_layers(layers, self.num_layers, "text")
        attn = batch["attention_mask"]
        out = self._run(batch["input_ids"], attn, layers)
        inter = {f"text.{i}": self._pool(out.hidden_states[i + 1], attn) for i in layers}
        mask = batch.get("text_mask", attn).bool()
        return TextFeatures(l2_normalize(self._pool(out.last_hidden_state, attn)), out.last_hidden_state, mask, inter)

    @property
    def logit_scale(self) -> float:
        return float(self.cfg.logit_scale)
