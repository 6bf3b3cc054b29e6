"""Export trained students.

``export_open_clip`` writes a folder that open_clip loads directly::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
    tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)

CLI: ``python -m students.export --checkpoint CKPT_OR_DIR --out DIR [--format open_clip|safetensors]``.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from distill.cli import ArgumentParser, cli_main, import_plugins
from students.base import Student
from students.io import load_student, save_student

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def export_open_clip(student: Student, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) and
    ``open_clip_model.safetensors`` for a student that is an open_clip model (``vit``)."""
    clip = getattr(student, "clip", None)
    if clip is None or not hasattr(student, "open_clip_model_cfg"):
        raise TypeError(f"the {student.name!r} student is not an open_clip architecture and cannot be "
                        "exported to open_clip; use students.save_student(student, DIR) "
                        "(or --format safetensors) instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": student.open_clip_model_cfg(), "preprocess_cfg": student.open_clip_preprocess_cfg()}
    weights = {k: v.detach().to("cpu").contiguous() for k, v in clip.state_dict().items()}
    save_file(weights, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m students.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or save_student folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--format", choices=("open_clip", "safetensors"), default="open_clip",
                    help="open_clip: loadable with open_clip 'local-dir:'; safetensors: students.load_student")
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="module to import first (e.g. one that registers a teacher); repeatable")
    args = ap.parse_args(argv)
    import_plugins(args.plugin)
    student = load_student(args.checkpoint)
    out = export_open_clip(student, args.out) if args.format == "open_clip" else save_student(student, args.out)
    print(f"wrote {args.format} export of the {student.name!r} student ({student.num_params():,} params) to {out}")


if __name__ == "__main__":
    cli_main(main)
