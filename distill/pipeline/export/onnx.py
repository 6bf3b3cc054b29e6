"""ONNX export of a student's two encoders (any student: ``vit``, ``pruned``, ``mwa``, ``pmf``).

``export_onnx(student, DIR)`` writes::

    DIR/image_encoder.onnx   pixels [batch, 3, S, S] float32 -> embed [batch, D] (L2-normalised)
    DIR/text_encoder.onnx    the student's tokenizer outputs (input_ids, + attention_mask when the
                             text tower uses it) [batch, length] int64 -> embed [batch, D]
    DIR/onnx_export.json     student config, preprocessing, tokenizer, logit scale, input names

Batch (and the text length) are dynamic axes. Images must be preprocessed as
``student.image_transform()`` does (described in ``preprocess``), captions tokenised as
``student.tokenize`` does (``tokenizer``). :func:`onnx_parity` runs both files with onnxruntime and
returns the worst cosine to the PyTorch embeddings.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from students.base import Student

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
META_FILE = "onnx_export.json"
EXAMPLE_CAPTIONS = ("a dog runs on the grass", "two people ride bicycles along a busy city street at night")


class _ImageEncoder(nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: Tensor) -> Tensor:
        return self.student.encode_image(pixels).embed


class _TextEncoder(nn.Module):
    def __init__(self, student: Student, keys: Sequence[str]) -> None:
        super().__init__()
        self.student, self.keys = student, list(keys)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.student.encode_text(dict(zip(self.keys, inputs))).embed


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, names: list[str], opset: int) -> list[str]:
    """Trace ``module`` to ``path`` with dynamic batch (and length for 2-D int inputs); returns the
    graph's input names (inputs the model never reads are dropped by the exporter)."""
    import onnx

    axes = {n: ({0: "batch", 1: "length"} if a.ndim == 2 and not a.is_floating_point() else {0: "batch"})
            for n, a in zip(names, args)}
    axes["embed"] = {0: "batch"}
    with warnings.catch_warnings():  # (not no_grad: MultiheadAttention would take its fused path, which has no ONNX op)
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["embed"], dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def export_onnx(student: Student, out_dir: str | Path, opset: int = 17) -> Path:
    """Write ``image_encoder.onnx``, ``text_encoder.onnx`` and ``onnx_export.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student = student.eval().to("cpu")
    pixels = torch.zeros(2, 3, student.image_size, student.image_size)
    text = student.tokenize(list(EXAMPLE_CAPTIONS))
    keys = list(text)
    image_inputs = _export(_ImageEncoder(student), (pixels,), out / IMAGE_FILE, ["pixels"], opset)
    text_inputs = _export(_TextEncoder(student, keys), tuple(text[k] for k in keys), out / TEXT_FILE, keys, opset)
    meta = {"format": "onnx", "opset": opset, "config": student.config(), "preprocess": student.preprocess_info(),
            "tokenizer": student.tokenizer_info(), "logit_scale": float(student.logit_scale.detach().exp()),
            "embed_dim": student.embed_dim, "image_encoder": {"file": IMAGE_FILE, "inputs": image_inputs},
            "text_encoder": {"file": TEXT_FILE, "inputs": text_inputs}}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return float(cos.min())


def onnx_parity(student: Student, out_dir: str | Path, pixels: Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Worst cosine between onnxruntime's and PyTorch's image / text embeddings of ``pixels``
    (already preprocessed) and ``captions``."""
    import onnxruntime as ort

    out = Path(out_dir)
    student = student.eval().to("cpu")
    text = student.tokenize(list(captions))
    with torch.no_grad():
        ref_img = student.encode_image(pixels).embed.numpy()
        ref_txt = student.encode_text(text).embed.numpy()
    img = ort.InferenceSession(str(out / IMAGE_FILE), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / TEXT_FILE), providers=["CPUExecutionProvider"])
    got_img = img.run(None, {"pixels": pixels.numpy().astype(np.float32)})[0]
    got_txt = txt.run(None, {i.name: text[i.name].numpy().astype(np.int64) for i in txt.get_inputs()})[0]
    return {"image": _cosine(got_img, ref_img), "text": _cosine(got_txt, ref_txt)}
