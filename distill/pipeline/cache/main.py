"""``python -m distill.cache_teacher``: precompute a frozen teacher's outputs for a dataset into a
sharded, resumable cache.

``python -m distill.cache_teacher --teacher openclip:ViT-B-32:laion2b_s34b_b79k --data DATA --out DIR``
(see ``--help`` and README.md, Design > Cache format). Shards are written to a temporary directory
and renamed when complete, so rerunning an interrupted command continues where it stopped and
produces the same bytes as an uninterrupted run; under ``torchrun`` rank r writes shards r, r+W, ...
The flags become a :class:`CacheSettings` and a :class:`CacheJob` for
:func:`distill.pipeline.cache.run.run_cache`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from distill.core.cache.encode import DTYPES, NONFINITE_MODES, OVERFLOW_MODES, parse_token_mode
from distill.core.data.pixels import PixelSettings
from distill.pipeline.cache.run import run_cache
from distill.pipeline.cache.settings import (BAD_SAMPLE_MODES, CacheJob, CacheSettings, parse_layers, parse_view_scale,
                                             resolve_view_tokens)
from distill.pipeline.cli import ArgumentParser, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m distill.cache_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher spec, e.g. openclip:ViT-B-32:laion2b_s34b_b79k")
    p.add_argument("--data", required=True, help="dataset: CSV/TSV, Karpathy/COCO JSON, a Flickr8k folder or "
                   "webdataset shards ('shards/{000..009}.tar')")
    p.add_argument("--split", default=None, help="split to cache (train/val/test); default: all rows")
    p.add_argument("--images-root", default=None, help="folder image paths are relative to (default: next to --data)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--batch-size", type=int, default=64, help="images (and captions) per teacher forward")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard (default: 1024; for webdataset input the samples per tar shard)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast for the teacher (CUDA only)")
    p.add_argument("--image-tokens", default="full", help="full | grid:<g> | topk:<k> | none")
    p.add_argument("--text-tokens", default="full", help="full | topk:<k> | none")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="token storage type")
    p.add_argument("--layers", nargs="*", default=[], help="intermediate layers, e.g. image.3,text.2")
    p.add_argument("--views", type=int, default=1, help="views per image (view 0 is the clean image)")
    p.add_argument("--view-seed", type=int, default=0)
    p.add_argument("--view-scale", default="0.5,1.0", help="min,max crop area fraction of the extra views")
    p.add_argument("--view-tokens", default=None,
                   help="image tokens of views >= 1 (and mixup views): same (as --image-tokens) | grid:<g> "
                        "(all views pooled to g x g, view 0 also kept as --image-tokens) | none "
                        "(view 0 only); default grid:2 when more than one view is cached")
    p.add_argument("--mixup-views", type=int, default=0,
                   help="extra mixup views per image (image blended with another image's view)")
    p.add_argument("--mixup-alpha", type=float, default=1.0, help="mixup weight lam ~ Beta(a, a), folded to >= 0.5")
    p.add_argument("--pixels", type=int, default=0, metavar="SIZE",
                   help="also store every view's student crop at SIZE x SIZE (uint8), so training reads no JPEGs")
    p.add_argument("--pixel-format", choices=("raw", "jpeg"), default="raw",
                   help="raw uint8 pixels or JPEG bytes (decoded in batches on the training device)")
    p.add_argument("--pixel-quality", type=int, default=90, help="JPEG quality of --pixel-format jpeg")
    p.add_argument("--on-bad-sample", choices=BAD_SAMPLE_MODES, default="error")
    p.add_argument("--verify", type=int, nargs="?", const=8, default=0, metavar="N",
                   help="recompute N (default 8) random samples and compare (cosine >= 0.999)")
    p.add_argument("--verify-existing", action="store_true",
                   help="re-hash (sha256) shards kept from an earlier run instead of checking sizes only")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher/dataset/settings")
    p.add_argument("--nonfinite", choices=NONFINITE_MODES, default="error",
                   help="teacher outputs with NaN/Inf: refuse the shard (error) or store them and record the counts "
                        "in the manifest (report)")
    p.add_argument("--overflow", choices=OVERFLOW_MODES, default="error",
                   help="outputs beyond the fp16 range (|x| > 65504): refuse (error) or store that array of that shard "
                        "in bf16 / fp32")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[CacheSettings, CacheJob]:
    """The parsed flags as (what determines the cache bytes, what to cache where and how)."""
    lo, hi = parse_view_scale(args.view_scale)
    image_tokens = parse_token_mode(args.image_tokens)
    view_tokens = resolve_view_tokens(args.view_tokens, image_tokens, args.views + args.mixup_views)
    pixels = PixelSettings(args.pixels, args.pixel_format, args.pixel_quality) if args.pixels else None
    settings = CacheSettings(image_tokens, parse_token_mode(args.text_tokens, allow_grid=False), args.dtype,
                             parse_layers(args.layers), args.views, args.view_seed, (lo, hi), args.shard_size,
                             view_tokens, args.mixup_views, args.mixup_alpha, pixels)
    job = CacheJob(args.teacher, args.data, args.out, args.split, args.images_root, args.batch_size, args.num_workers,
                   args.device, args.amp, args.verify, args.verify_existing, args.overwrite, args.on_bad_sample,
                   args.nonfinite, args.overflow, tuple(args.plugin))
    return settings, job


#: What to do after Ctrl-C (printed by distill.pipeline.cli.run_cli).
INTERRUPTED_HINT = "rerun the same command to resume (finished shards are kept)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success (typed errors propagate to :func:`distill.pipeline.cli.run_cli`)."""
    result = run_cache(*settings_from_args(build_parser().parse_args(argv)))
    if result.rank == 0:
        if result.verify:
            print("verify OK: min cosine " + ", ".join(f"{k} {v:.5f}" for k, v in result.verify.items()), file=sys.stderr)
        print(result.summary())
    return 0


if __name__ == "__main__":
    cli_main(main)
