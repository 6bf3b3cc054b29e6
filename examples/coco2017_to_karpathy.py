"""Convert COCO-2017 caption annotations into one Karpathy-style JSON for examples/coco.sh.

    python examples/coco2017_to_karpathy.py captions_train2017.json captions_val2017.json OUT.json [--val-images 1000]

COCO-2017 has no caption test split of its own, so: ``test`` = every val2017 image (5,000, the
usual 5K evaluation set), ``val`` = the last ``--val-images`` train2017 images by id (held out from
training, used for validation during training), ``train`` = the other train2017 images. Entries
carry ``filepath`` ``train2017`` / ``val2017``, so the images root is the folder holding both.
Exits with status 2 and one line naming the file when an input is missing or malformed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise ValueError("not a COCO captions file (needs images[] and annotations[])")
        return data
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}")


def _entries(data: dict[str, Any], folder: str) -> list[dict[str, Any]]:
    """Karpathy ``images[]`` entries sorted by image id, captions in annotation order."""
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    return [{"filepath": folder, "filename": im["file_name"], "imgid": im["id"], "cocoid": im["id"],
             "sentences": [{"raw": c} for c in caps.get(im["id"], [])]}
            for im in sorted(data["images"], key=lambda im: im["id"]) if im["id"] in caps]


def convert(train_json: Path, val_json: Path, val_images: int) -> dict[str, Any]:
    train, test = _entries(_load(train_json), "train2017"), _entries(_load(val_json), "val2017")
    if not 0 <= val_images < len(train):
        sys.exit(f"error: --val-images {val_images} must be in [0, {len(train)}) (train2017 images with captions)")
    for k, e in enumerate(train):
        e["split"] = "val" if k >= len(train) - val_images else "train"
    for e in test:
        e["split"] = "test"
    return {"dataset": "coco2017", "images": train + test}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train_json", type=Path)
    ap.add_argument("val_json", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--val-images", type=int, default=1000, help="train2017 images held out for validation")
    args = ap.parse_args(argv)
    data = convert(args.train_json, args.val_json, args.val_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data))
    n = {s: sum(e["split"] == s for e in data["images"]) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: train {n['train']}, val {n['val']}, test {n['test']} images")


if __name__ == "__main__":
    main()
