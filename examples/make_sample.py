"""Rebuild the bundled quickstart sample (``examples/sample_flickr8k``) from the full Flickr8k folder.

Takes the first ``--train`` images of the official train split and the first ``--test`` images of
the official test split, resized to ``--size`` px, with all their captions, in the same layout as
``shared/data/flickr8k`` (images/, captions.tsv, splits/).

    python examples/make_sample.py --src ../shared/data/flickr8k --out examples/sample_flickr8k
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample_flickr8k")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quality", type=int, default=85)
    args = ap.parse_args(argv)

    splits = {}
    for name, n in (("train", args.train), ("test", args.test)):
        lines = (args.src / "splits" / f"{name}.txt").read_text().split()
        splits[name] = lines[:n]
    keep = {img for names in splits.values() for img in names}
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "splits").mkdir(exist_ok=True)
    for img in sorted(keep):
        with Image.open(args.src / "images" / img) as im:
            im.convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC).save(
                args.out / "images" / img, quality=args.quality, optimize=True)
    header, *body = (args.src / "captions.tsv").read_text(encoding="utf-8").splitlines()
    rows = [header] + [line for line in body if line.split("\t", 1)[0] in keep]
    (args.out / "captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name, names in splits.items():
        (args.out / "splits" / f"{name}.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {len(keep)} images and {len(rows) - 1} captions to {args.out}")


if __name__ == "__main__":
    main()
