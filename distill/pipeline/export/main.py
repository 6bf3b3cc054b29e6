"""Export trained students.

* ``open_clip`` (``vit`` students only): a folder that open_clip loads directly::

      model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
      tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)

* ``onnx`` (every student): ``image_encoder.onnx`` + ``text_encoder.onnx``, see :mod:`distill.pipeline.export.onnx`;
* ``hf`` (``vit`` students): a ``transformers.CLIPModel`` folder, see :mod:`distill.pipeline.export.hf`;
* ``safetensors``: :func:`students.save_student` (reload with :func:`students.load_student`).

CLI: ``python -m distill.export --checkpoint CKPT_OR_DIR --out DIR [--format open_clip|onnx|hf|safetensors]``;
``onnx`` and ``hf`` exports are checked against PyTorch on two random images and two captions.
Library: :func:`export_student` (a checkpoint/folder or a loaded student -> :class:`ExportResult`);
a format the student's architecture cannot express raises :class:`~distill.core.errors.ExportError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from distill.core.errors import ConfigError, ExportError
from distill.core.lock import output_lock
from distill.pipeline.cli import ArgumentParser, cli_main
from distill.pipeline.settings import check_out_folder
from students.base import Student
from students.io import load_student, save_student

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
FORMATS = ("open_clip", "onnx", "hf", "safetensors")


def export_open_clip(student: Student, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) and
    ``open_clip_model.safetensors`` for a student that is an open_clip model (``vit``)."""
    clip = getattr(student, "clip", None)
    if clip is None or not hasattr(student, "open_clip_model_cfg"):
        raise ExportError(f"the {student.name!r} student is not an open_clip architecture and cannot be "
                          "exported to open_clip (only 'vit' students can); use --format onnx for deployment, or "
                          "students.save_student(student, DIR) (--format safetensors) to reload it with load_student")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": student.open_clip_model_cfg(), "preprocess_cfg": student.open_clip_preprocess_cfg()}
    weights = {k: v.detach().to("cpu").contiguous() for k, v in clip.state_dict().items()}
    save_file(weights, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class ExportResult:
    """One export: the folder written, its format, the exported student (name, parameters) and, for
    ``onnx``/``hf``, the parity check's worst cosines against PyTorch (``{"image", "text"}``)."""

    folder: Path
    format: str
    student: str
    num_params: int
    parity: dict[str, float] = field(default_factory=dict)


def export_student(student: Student | str | Path, out_dir: str | Path, fmt: str = "open_clip") -> ExportResult:
    """Export ``student`` (a loaded student, a training checkpoint or a ``save_student`` folder) in
    ``fmt`` to ``out_dir`` (held with ``writer.lock`` while writing; an existing file there is
    refused first); an architecture the format cannot express raises :class:`ExportError`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    check_out_folder(out_dir)
    model = student if isinstance(student, Student) else load_student(student)
    with output_lock(out_dir):  # one writer per folder (writer.lock)
        out, parity = export(model, fmt, out_dir)
    return ExportResult(Path(out), fmt, model.name, model.num_params(), parity)


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.export``: export and report; returns the exit code."""
    ap = ArgumentParser(prog="python -m distill.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or save_student folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--format", choices=FORMATS, default="open_clip",
                    help="open_clip: loadable with open_clip 'local-dir:' (vit only); onnx: image + text encoder "
                         "ONNX files (any student); hf: transformers CLIPModel folder (vit only); "
                         "safetensors: students.load_student")
    args = ap.parse_args(argv)
    result = export_student(args.checkpoint, args.out, args.format)
    print(f"wrote {result.format} export of the {result.student!r} student ({result.num_params:,} params) to {result.folder}")
    if result.parity:
        print(f"parity with PyTorch (min cosine): image {result.parity['image']:.6f}, text {result.parity['text']:.6f}")
    return 0


def export(student: Student, fmt: str, out_dir: str | Path) -> tuple[Path, dict[str, float]]:
    """Export in ``fmt``; returns the folder and, for ``onnx``/``hf``, the parity check's worst cosines
    on two random images and :data:`distill.pipeline.export.onnx.EXAMPLE_CAPTIONS`."""
    if fmt == "open_clip":
        return export_open_clip(student, out_dir), {}
    if fmt == "safetensors":
        return save_student(student, out_dir), {}
    import torch

    from distill.pipeline.export.onnx import EXAMPLE_CAPTIONS

    pixels = torch.randn(2, 3, student.image_size, student.image_size, generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        from distill.pipeline.export.onnx import export_onnx, onnx_parity

        out = export_onnx(student, out_dir)
        return out, onnx_parity(student, out, pixels, list(EXAMPLE_CAPTIONS))
    if fmt == "hf":
        from distill.pipeline.export.hf import export_hf, hf_parity

        out = export_hf(student, out_dir)
        return out, hf_parity(student, out, pixels, list(EXAMPLE_CAPTIONS))
    raise ConfigError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")


if __name__ == "__main__":
    cli_main(main)
