"""Cost of the default lazy sha256 check of a teacher cache vs one training epoch's reads.

``TeacherCache(verify="lazy")`` (the default) hashes every array file once per process, the first
time it is read. This benchmark builds a real cache (a 1-block copy of the teacher: identical
output shapes) of Flickr8k images and times, interleaved round by round:

* ``hash``: sha256 of every array file of the cache (what lazy verification adds per process);
* ``cache_read``: one shuffled training epoch of teacher lookups (one view and one caption per
  image, :func:`distill.pipeline.train.data.fetch_teacher`, fp16 kept as in training);
* ``image_decode``: one epoch of decoding the images and the student's 224 px transform.

A training epoch does at least ``cache_read + image_decode`` (plus the student's forward and
backward, not timed here, so the fraction below is an upper bound). Target: ``hash`` < 5% of that.

    python benchmarks/cache_verify_cost.py                      # ViT-B/16-shaped cache, 128 images
    python benchmarks/cache_verify_cost.py --teacher openclip:ViT-L-14 --images 256
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from distill.core.cache import TeacherCache  # noqa: E402
from distill.core.cache.verify import sha256_file  # noqa: E402
from distill.core.data.factory import load_dataset  # noqa: E402
from distill.pipeline.train.data import fetch_teacher  # noqa: E402

NAME = "cache_verify_cost"
TARGET = 0.05


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(p, NAME)
    C.add_clock_args(p)
    p.add_argument("--teacher", default="openclip:ViT-B-16", help="teacher spec whose output shapes the cache has")
    p.add_argument("--images", type=int, default=128, help="images in the cache")
    p.add_argument("--data", default="auto", choices=("auto", "flickr8k", "synthetic"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-tokens", default="full", help="cache --image-tokens")
    p.add_argument("--text-tokens", default="full", help="cache --text-tokens")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "int8"), help="cache --dtype")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = C.setup(args)
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp_dir:
        tmp = Path(tmp_dir)
        tsv, data_desc = C.benchmark_dataset(tmp / "data", args.images, args.data, args.seed)
        teacher = C.shallow_teacher_spec(args.teacher, 1, tmp / "teacher_cfg") or args.teacher
        C.build_cache(teacher, tsv, tmp / "cache", 32, device, args.plugin,
                      ["--image-tokens", args.image_tokens, "--text-tokens", args.text_tokens, "--dtype", args.dtype])
        cache = TeacherCache(tmp / "cache", verify="size")
        ds = load_dataset(tsv)
        files = [(cache.path / s["dir"] / f"{n}.npy") for s in cache.manifest["shards"] for n in s["arrays"]]
        total_bytes = sum(f.stat().st_size for f in files)
        transform = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                               T.Normalize([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])])
        rng = np.random.default_rng(args.seed)

        def hash_all() -> None:
            for f in files:
                sha256_file(f)

        def read_epoch() -> None:
            order = rng.permutation(cache.num_images)
            for a in range(0, len(order), args.batch_size):
                ids = order[a:a + args.batch_size]
                caps = cache.offsets[ids] + rng.integers(0, np.diff(cache.offsets)[ids])
                fetch_teacher(cache, ids, caps, np.zeros_like(ids), keep_fp16=True)

        def decode_epoch() -> None:
            for i in range(ds.num_images):
                transform(ds.load_image(i))

        timings = C.time_interleaved({"hash": hash_all, "cache_read": read_epoch, "image_decode": decode_epoch},
                                     args.warmup, args.repeats, device, args.clock)
        hash_s, read_s, decode_s = (timings[k].median for k in ("hash", "cache_read", "image_decode"))
        frac = hash_s / (read_s + decode_s)
        auto = TeacherCache(tmp / "cache").verify  # what the default ("auto") picks for this cache
        results = {
            "seconds": {k: t.to_json() for k, t in timings.items()},
            "cache_bytes": total_bytes, "array_files": len(files), "num_images": cache.num_images,
            "num_captions": cache.num_captions, "hash_gb_per_s": total_bytes / hash_s / 1e9,
            "hash_fraction_of_cache_read": hash_s / read_s,
            "hash_fraction_of_epoch_lower_bound": frac,
            "stored_bytes_per_image": total_bytes / cache.num_images,
            # largest bytes/image whose hash stays under TARGET of this epoch's data-side time
            "lazy_break_even_bytes_per_image": TARGET * (read_s + decode_s) / cache.num_images * total_bytes / hash_s,
            "default_verify_picks": auto,
            "targets": {"hash_fraction_of_epoch_lower_bound": {"target": TARGET, "value": frac, "met": frac < TARGET},
                        "default_is_lazy_only_when_cheap": {"value": auto, "target": "lazy iff hash < target",
                                                            "met": (auto == "lazy") == (frac < TARGET)}},
            "cache_dims": cache.dims, "storage": cache.storage,
        }
        settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "dataset": data_desc,
                    "cache_teacher": Path(teacher).name}
    notes = ["lazy verification hashes each array file once per reading process (each DataLoader worker)",
             "epoch lower bound = cache_read + image_decode; the student's forward/backward comes on top",
             "the hash reads all captions and views, an epoch reads one caption and one view per image"]
    out = C.write_result(NAME, args.out, device, settings, results, notes)
    C.print_summary(NAME, f"sha256 of {total_bytes / 1e6:.1f} MB: {hash_s:.3f} s ({results['hash_gb_per_s']:.2f} GB/s); "
                          f"epoch cache reads {read_s:.3f} s + image decode {decode_s:.3f} s: hash = "
                          f"{100 * frac:.1f}% of the epoch ({'cheap' if frac < TARGET else 'not cheap'}: limit "
                          f"{100 * TARGET:.0f}%); {100 * hash_s / read_s:.0f}% of the cache reads alone; default verify "
                          f"picks {auto}: {'PASS' if (auto == 'lazy') == (frac < TARGET) else 'FAIL'} "
                          f"({C.clock_label(args)})", out)
    return results


if __name__ == "__main__":
    C.script_main(main)
