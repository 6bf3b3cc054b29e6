"""Teacher-cache loader throughput vs a plain memory copy of the same bytes.

A DataLoader reads one shuffled epoch of teacher features (image embedding + image tokens, one
caption's embedding + tokens + mask per sample) from a real cache through
:func:`distill.pipeline.train.data.fetch_teacher` (memory-mapped gathers; fp16 stays fp16 as in training, int8 -> float32). The
baseline copies the same number of stored bytes per batch from one RAM buffer into another
(``np.copyto``). Rounds are interleaved; the first (untimed) round also warms the page cache.
Target: loader samples/s >= 50% of the copy's samples/s. (Whether the loader keeps up with a
training step is measured by ``train_step_speed.py``: ``loader_fraction_of_cache_step``.)

    python benchmarks/cache_loader_speed.py                    # ViT-L/14-shaped cache, 256 images
    python benchmarks/cache_loader_speed.py --shard-size 64        # batches spanning 4 shards
    python benchmarks/cache_loader_speed.py --images 2048 --batch-size 256 --num-workers 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.cache import TeacherCache, bytes_per_sample  # noqa: E402
from distill.core.cache.schema import IMAGE, field_array, scale_array  # noqa: E402
from distill.core.features import TeacherTargets  # noqa: E402
from distill.pipeline.train.data import fetch_teacher  # noqa: E402

NAME = "cache_loader_speed"
TARGET = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    p.add_argument("--teacher", default="openclip:ViT-L-14",
                   help="teacher spec whose output shapes the cache has (built-in open_clip names are cached by a 1-block copy)")
    p.add_argument("--images", type=int, default=256, help="images in the cache")
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--image-tokens", default="full", help="cache --image-tokens")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "int8"), help="cache --dtype")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="cache --shard-size (below --images, batches gather across shards: the slower path)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    return p


class FeatureCollate:
    """Batch of image indices -> the cached teacher features of each image and its first caption."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __call__(self, image_index: list[int]) -> TeacherTargets:
        ids = np.asarray(image_index, dtype=np.int64)
        return fetch_teacher(self.cache, ids, self.cache.offsets[ids], np.zeros_like(ids), keep_fp16=True)


def stored_bytes_per_sample(cache: TeacherCache) -> float:
    """Stored bytes one sample reads: its image arrays (view 0) and one caption's text arrays."""
    b = bytes_per_sample(cache)
    tokens = field_array(IMAGE, "tokens")
    names = (field_array(IMAGE, "embed"), tokens, scale_array(tokens), field_array(IMAGE, "token_index"))
    image = sum(v for k, v in b.items() if k in names)
    text = sum(v for k, v in b.items() if k.startswith("text_") and k != "text_total")
    return image / cache.num_views + text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    C.require_wall_clock_for_workers(args)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        cache_teacher = C.shallow_teacher_spec(args.teacher, 1, tmp / "teacher_cfg") or args.teacher
        C.build_cache(cache_teacher, tsv, tmp / "cache", 32, device, args.plugin,
                      ["--image-tokens", args.image_tokens, "--dtype", args.dtype, "--shard-size", str(args.shard_size)])
        cache = TeacherCache(tmp / "cache")
        loader = DataLoader(range(cache.num_images), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.num_workers, collate_fn=FeatureCollate(cache),
                            persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed))
        per_sample = stored_bytes_per_sample(cache)
        batches = len(loader)
        samples = batches * args.batch_size
        batch_bytes = int(round(per_sample * args.batch_size))
        src = np.random.default_rng(args.seed).integers(0, 256, size=batch_bytes * batches, dtype=np.uint8)
        dst = np.empty(batch_bytes, dtype=np.uint8)
        decoded = {"bytes": 0}

        def read_epoch() -> None:
            for b in loader:
                decoded["bytes"] = b.image.embed.nbytes + b.text.embed.nbytes + b.image.tokens.nbytes + b.text.tokens.nbytes

        def copy_epoch() -> None:
            for i in range(batches):
                np.copyto(dst, src[i * batch_bytes:(i + 1) * batch_bytes])

        timings = C.time_interleaved({"loader": read_epoch, "memcpy": copy_epoch}, args.warmup, args.repeats, device, args.clock)
        loader_rate = samples / timings["loader"].median
        copy_rate = samples / timings["memcpy"].median
        frac = loader_rate / copy_rate
        results = {
            "seconds_per_epoch": {k: t.to_json() for k, t in timings.items()},
            "samples_per_epoch": samples, "stored_bytes_per_sample": per_sample,
            "bytes_per_sample_returned": decoded["bytes"] / args.batch_size,
            "loader_samples_per_s": loader_rate, "memcpy_samples_per_s": copy_rate,
            "loader_gb_per_s": loader_rate * per_sample / 1e9, "memcpy_gb_per_s": copy_rate * per_sample / 1e9,
            "loader_fraction_of_memcpy": frac, "target_fraction": TARGET, "pass": frac >= TARGET,
            "cache_dims": cache.dims, "storage": cache.storage,
        }
        settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc,
                    "cache_teacher": Path(cache_teacher).name}
    notes = ["rounds alternate: one loader epoch, then a copy of the same stored bytes in batch-sized chunks",
             "the loader returns float32 (fp16/int8 dequantised), i.e. it writes more bytes than it reads"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    C.print_summary(NAME, f"loader {loader_rate:.0f} samples/s ({results['loader_gb_per_s']:.2f} GB/s stored), memcpy "
                          f"{copy_rate:.0f} samples/s ({results['memcpy_gb_per_s']:.2f} GB/s): {100 * frac:.0f}% of memcpy "
                          f"(target >= {100 * TARGET:.0f}%) {'PASS' if results['pass'] else 'FAIL'}; "
                          f"{per_sample / 1e3:.1f} kB/sample ({C.clock_label(args)})", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
