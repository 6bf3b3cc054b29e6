"""Bytes per sample of each token-storage mode of the teacher cache, relative to full fp32.

Real caches of the same images are written with ``--image-tokens full --dtype fp16`` (``full_fp16``),
``--image-tokens grid:<g>`` (``grid<g>_fp16``) and ``--dtype int8`` (``full_int8``), read back
with :func:`distill.core.cache.reader.bytes_per_sample`. ``full_fp32`` is not a cache option: it is the
``full_fp16`` layout with every float array at 4 bytes (an uncompressed float32 dump). Text
tokens are padded to the longest caption of each shard, so text bytes depend on the captions.
(The RSUM cost of each mode comes from the quality benchmark, not from here.)

    python benchmarks/token_storage_bytes.py                   # ViT-L/14 shapes, 32 Flickr8k images
    python benchmarks/token_storage_bytes.py --teacher openclip:ViT-B-16 --grid 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.cache import TeacherCache, bytes_per_sample  # noqa: E402

NAME = "token_storage_bytes"
KEYS = ("image_total", "text_total", "per_image_with_captions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    p.add_argument("--teacher", default="openclip:ViT-L-14",
                   help="teacher spec (built-in open_clip names are cached by a 1-block copy: same shapes)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--grid", type=int, default=4, help="side of the pooled token grid (grid:<g>)")
    p.add_argument("--shard-size", type=int, default=1024)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    modes = {"full_fp16": ["--image-tokens", "full"], f"grid{args.grid}_fp16": ["--image-tokens", f"grid:{args.grid}"],
             "full_int8": ["--image-tokens", "full", "--dtype", "int8"]}
    per_mode: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_bytes_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        cache_teacher = C.shallow_teacher_spec(args.teacher, 1, tmp / "teacher_cfg") or args.teacher
        dims: dict[str, Any] = {}
        for name, flags in modes.items():
            C.build_cache(cache_teacher, tsv, tmp / name, 32, device, args.plugin,
                          [*flags, "--shard-size", str(args.shard_size)])
            cache = TeacherCache(tmp / name)
            per_mode[name] = bytes_per_sample(cache)
            if name == "full_fp16":
                per_mode = {"full_fp32": bytes_per_sample(cache, fp16_as_fp32=True), **per_mode}
                dims = cache.dims
    base = per_mode["full_fp32"]
    results = {"modes": {name: {**{k: b[k] for k in KEYS}, "arrays": {k: v for k, v in b.items() if k not in KEYS},
                                **{f"ratio_{k}_vs_full_fp32": b[k] / base[k] for k in KEYS}}
                         for name, b in per_mode.items()},
               "dims": dims}
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc,
                "cache_teacher": Path(cache_teacher).name}
    notes = ["full_fp32 is computed from the full_fp16 cache (float arrays at 4 bytes); the others are real caches",
             "image bytes: embedding + tokens (+ int8 scales, view params); text bytes: embedding + tokens + mask"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    parts = [f"{name} {b['image_total'] / 1e3:.1f} kB/img + {b['text_total'] / 1e3:.1f} kB/cap "
             f"({b['ratio_per_image_with_captions_vs_full_fp32']:.3f}x)" for name, b in results["modes"].items()]
    C.print_summary(NAME, "; ".join(parts) + " (ratio: image + its captions vs full fp32)", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
