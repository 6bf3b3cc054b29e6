"""Image-caption datasets: CSV/TSV, Karpathy JSON, COCO captions JSON, the Flickr8k layout and
webdataset ``.tar`` shards (:mod:`distill.core.data.wds`).

Every loader returns an :class:`ImageTextDataset` whose captions are grouped by image
(``offsets[i]:offsets[i+1]`` are the captions of image ``i``), which is the layout of the cache and
of the multi-caption retrieval protocol.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile

from distill.core.data.image_checks import check_png_complete, to_rgb

from distill.core.errors import BadSampleError, NoSplitsError, SplitError

SPLIT_ALIASES = {"val": {"val", "dev"}, "dev": {"val", "dev"}, "train": {"train", "restval"}, "test": {"test"}}


def check_split(split: str | None, known: Iterable[str] | None, source: Path | str) -> None:
    """Raise unless ``split`` (None/"all": every row) is one of ``known`` (aliases: val=dev,
    train includes restval); ``known=None``: the format has no splits."""
    if split in (None, "all"):
        return
    if known is None:
        raise NoSplitsError(f"{source}: this dataset has no splits, so --split {split!r} cannot select rows; "
                            "use split 'all' (or omit --split) and keep train and test data in separate files")
    known = set(known)
    if not SPLIT_ALIASES.get(split, {split}) & known:
        raise SplitError(f"{source}: unknown split {split!r}; known splits: {', '.join(sorted(known)) or 'none'}")


def file_split(path: Path) -> list[str] | None:
    """The split a single-file dataset holds by its name (``captions_train2017.json`` -> ["train"]),
    when the name names exactly one of train/val/test; else None (no splits)."""
    words = {w.rstrip("0123456789") for w in re.split(r"[^a-z0-9]+", path.stem.lower())}
    found = [w for w in ("train", "val", "test") if w in words]
    return found if len(found) == 1 else None


@dataclass
class BadSample:
    where: str
    reason: str


@dataclass
class ImageTextDataset:
    """Images (paths relative to ``root``) with one or more captions each."""

    root: Path
    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # [num_captions] int64, non-decreasing image index of each caption
    name: str = "dataset"
    split: str = "all"
    image_sources: list[str] = field(default_factory=list)  # "file:row" where each image was declared
    skipped: list[BadSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) and np.any(np.diff(self.caption_image) < 0):
            raise ValueError("captions must be grouped by image")
        if not self.image_sources:
            self.image_sources = [f"{self.name}:image {i}" for i in range(len(self.images))]

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def offsets(self) -> np.ndarray:
        """[num_images + 1] start offsets of each image's captions."""
        counts = np.bincount(self.caption_image, minlength=self.num_images)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def captions_of(self, i: int) -> list[str]:
        o = self.offsets
        return self.captions[o[i]:o[i + 1]]

    def image_path(self, i: int) -> Path:
        return self.root / self.images[i]

    def load_image(self, i: int) -> Image.Image:
        """Decode image ``i`` as RGB; a missing or corrupt file raises :class:`BadSampleError`."""
        return decode_image(self.image_path(i), self.image_sources[i])

    def image_stat(self, i: int) -> tuple[int, int]:
        """(size in bytes, mtime in ns) of image ``i``'s file; (-1, -1) when it cannot be stat'ed."""
        try:
            st = os.stat(self.image_path(i))
        except OSError:
            return -1, -1
        return st.st_size, st.st_mtime_ns

    def stats_digest(self, start: int = 0, end: int | None = None) -> str:
        """sha256 over the size and mtime of images ``start:end``; the cache records it per shard
        to detect image files replaced after caching (the content :meth:`fingerprint` does not
        change when a file is replaced under the same name)."""
        h = hashlib.sha256()
        for i in range(start, self.num_images if end is None else end):
            h.update(np.asarray(self.image_stat(i), dtype=np.int64).tobytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """sha256 over name-independent content: image paths, captions and their grouping."""
        h = hashlib.sha256()
        for p in self.images:
            h.update(p.encode() + b"\0")
        h.update(b"\1")
        for c in self.captions:
            h.update(c.encode() + b"\0")
        h.update(self.caption_image.tobytes())
        return h.hexdigest()

    def subset(self, image_indices: Sequence[int]) -> "ImageTextDataset":
        """A dataset of the chosen images (in the given order) and all their captions."""
        o = self.offsets
        caps: list[str] = []
        cap_img: list[int] = []
        for new, i in enumerate(image_indices):
            caps.extend(self.captions[o[i]:o[i + 1]])
            cap_img.extend([new] * int(o[i + 1] - o[i]))
        return ImageTextDataset(self.root, [self.images[i] for i in image_indices], caps, np.asarray(cap_img),
                                self.name, self.split, [self.image_sources[i] for i in image_indices], list(self.skipped))

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "root": str(self.root), "num_images": self.num_images,
                "num_captions": self.num_captions, "fingerprint": self.fingerprint(),
                "skipped": len(self.skipped)}


class TransformedImages:
    """The images of a dataset through ``transform``, as a map-style dataset for a DataLoader."""

    def __init__(self, data: ImageTextDataset, transform: Callable[[Image.Image], Any]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.data.load_image(i))


def decode_image(path: Path, where: str) -> Image.Image:
    """Decode ``path`` fully as RGB; refuses truncated files (PNG included) and converts 16-bit
    images with scaling. Every failure is a :class:`BadSampleError` naming ``where`` and the file."""
    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library: never accept truncated images
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as im:
            im.load()
            if im.format == "PNG":
                check_png_complete(path)
            return to_rgb(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadSampleError(f"{where}: cannot decode image {path}: {e}") from e


def normalise_image_path(rel: str) -> str:
    """One spelling per file: ``./images/a.jpg``, ``images//a.jpg`` and ``images/../images/a.jpg``
    all become ``images/a.jpg`` (lexically; escapes are still refused by :func:`_safe_relpath`)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return rel
    return posixpath.normpath(rel)


def _safe_relpath(root: Path, rel: str, where: str) -> str:
    """Reject absolute paths and paths whose text leaves ``root`` through ``..``. Symlinks inside
    the root (e.g. ``images -> /mnt/big/images``) are the user's own and are followed."""
    if not isinstance(rel, str):
        raise BadSampleError(f"{where}: image path must be a string, got {type(rel).__name__} {rel!r}")
    if not rel:
        raise BadSampleError(f"{where}: empty image path")
    if "\0" in rel:
        raise BadSampleError(f"{where}: image path {rel!r} contains a NUL byte")
    p = Path(rel)
    if p.is_absolute():
        raise BadSampleError(f"{where}: image path {rel!r} is absolute; paths must be relative to {root}")
    if os.path.normpath(p).split(os.sep)[0] == "..":
        raise BadSampleError(f"{where}: image path {rel!r} escapes the data root {root} through '..' "
                             "(symlinks inside the root are followed; '..' paths are refused)")
    return p.as_posix()


Row = tuple[str, str, str] | BadSampleError


def _assemble(root: Path, rows: Iterable[Row], name: str, split: str, on_bad: str,
              check_decode: bool = False) -> ImageTextDataset:
    """Group (image, caption, where) rows by image in first-seen order, validating each row.

    A loader yields a :class:`BadSampleError` instead of a row for a malformed record, so that
    ``on_bad="skip"`` skips it like any other bad row."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', not {on_bad!r}")
    order: dict[str, int] = {}
    sources: list[str] = []
    per_image: list[list[str]] = []
    skipped: list[BadSample] = []
    bad_images: set[str] = set()
    for row in rows:
        where = row.where if isinstance(row, BadSampleError) else row[2]
        try:
            if isinstance(row, BadSampleError):
                raise row
            image, caption, _ = row
            image = normalise_image_path(image)
            if image in bad_images:
                raise BadSampleError(f"{where}: image {image!r} was rejected on an earlier row")
            try:
                if image not in order:
                    rel = _safe_relpath(root, image, where)
                    path = root / rel
                    if not path.is_file():
                        raise BadSampleError(f"{where}: image file not found: {path} (image paths are relative to "
                                             f"{root}; pass --images-root DIR if the images are elsewhere)")
                    if check_decode:
                        decode_image(path, where)
            except BadSampleError:
                bad_images.add(image)
                raise
            if caption is not None and not isinstance(caption, str):
                raise BadSampleError(f"{where}: caption must be a string, got {type(caption).__name__}")
            if caption is None or not caption.strip():
                raise BadSampleError(f"{where}: empty caption for image {image!r}")
            if image not in order:
                order[image] = len(order)
                sources.append(where)
                per_image.append([])
            per_image[order[image]].append(caption.strip())
        except BadSampleError as e:
            if on_bad == "error":
                raise
            skipped.append(BadSample(where, str(e)))
    images = [Path(i).as_posix() for i in order]
    captions = [c for caps in per_image for c in caps]
    cap_img = np.repeat(np.arange(len(images)), [len(c) for c in per_image]) if images else np.zeros(0, np.int64)
    if not images:
        raise BadSampleError(f"{name}: no usable samples in split {split!r}")
    return ImageTextDataset(root, images, captions, cap_img, name, split, sources, skipped)


def _in_split(row_split: str | None, split: str | None) -> bool:
    if split in (None, "all") or row_split is None:
        return True
    return row_split in SPLIT_ALIASES.get(split, {split})


def load_csv(path: Path, split: str | None = None, images_root: Path | None = None,
             on_bad_sample: str = "error", check_decode: bool = False) -> ImageTextDataset:
    """CSV/TSV with a header naming the image column (``image``/``filepath``/``file_name``) and the
    caption column (``caption``/``title``/``text``), optional ``split``. Without a recognised header
    the first two columns are image, caption."""
    tsv = path.suffix.lower() in (".tsv", ".txt")
    root = Path(images_root) if images_root else path.parent
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:  # TSV captions may contain bare quotes
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        rows_all = _read_rows(reader, path)
    if not rows_all:
        raise BadSampleError(f"{path}: empty file")
    if isinstance(rows_all[0], BadSampleError):
        raise rows_all[0]
    header = [h.strip().lower() for h in rows_all[0]]
    img_col = next((header.index(k) for k in ("image", "filepath", "file_name", "filename", "path") if k in header), None)
    cap_col = next((header.index(k) for k in ("caption", "title", "text", "sentence") if k in header), None)
    split_col = header.index("split") if "split" in header else None
    start = 1
    if img_col is None or cap_col is None:
        img_col, cap_col, start = 0, len(header) - 1, 0
    check_split(split, {r[split_col].strip() for r in rows_all[start:] if len(r) > split_col}
                if split_col is not None else file_split(path), path)

    def rows():
        for n, r in enumerate(rows_all[start:], start=start + 1):
            where = f"{path}:{n}"
            if isinstance(r, BadSampleError):
                yield r
                continue
            if not any(c.strip() for c in r):
                continue
            if len(r) <= max(img_col, cap_col):
                yield BadSampleError(f"{where}: expected at least {max(img_col, cap_col) + 1} columns, got {len(r)}", where)
                continue
            if split_col is not None and not _in_split(r[split_col].strip(), split):
                continue
            yield r[img_col].strip(), r[cap_col], where

    return _assemble(root, rows(), path.stem, split or "all", on_bad_sample, check_decode)


def _read_rows(reader: Any, path: Path) -> list[list[str] | BadSampleError]:
    """All rows of a csv reader over a ``surrogateescape`` text file; a row that is not UTF-8 or
    that the csv module rejects (e.g. a field over ``csv.field_size_limit()``) becomes a
    :class:`BadSampleError` naming ``path:line`` in its place, so that it can be skipped."""
    rows: list[list[str] | BadSampleError] = []
    while True:
        try:
            r = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            where = f"{path}:{reader.line_num}"
            rows.append(BadSampleError(f"{where}: malformed row: {e}", where))
            continue
        if any(_has_surrogates(c) for c in r):
            where = f"{path}:{len(rows) + 1}"
            rows.append(BadSampleError(f"{where}: row is not valid UTF-8 text", where))
            continue
        rows.append(r)


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, under errors="surrogateescape"


def _has_surrogates(text: str) -> bool:
    return _UNDECODABLE.search(text) is not None


def read_json(path: Path) -> Any:
    """Parse a JSON dataset file; broken JSON or non-UTF-8 bytes raise :class:`BadSampleError`
    naming the file and position (a whole-file error: not skippable)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{path}: byte {e.start}: not valid UTF-8 ({e.reason})", str(path)) from e
    except json.JSONDecodeError as e:
        raise BadSampleError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg} (char {e.pos})", str(path)) from e


def _karpathy_entry(im: Any, where: str) -> tuple[str, list[Any]]:
    """(relative image path, sentences) of one Karpathy ``images[n]`` entry, validated."""
    if not isinstance(im, dict):
        raise BadSampleError(f"{where}: expected an object, got {type(im).__name__}", where)
    name = im.get("filename")
    if not isinstance(name, str) or not name:
        raise BadSampleError(f"{where}: 'filename' must be a non-empty string, got {name!r}", where)
    folder = im.get("filepath")
    if folder is not None and not isinstance(folder, str):
        raise BadSampleError(f"{where}: 'filepath' must be a string, got {folder!r}", where)
    sents = im.get("sentences") or []
    if not isinstance(sents, list):
        raise BadSampleError(f"{where}: 'sentences' must be a list, got {type(sents).__name__}", where)
    return (f"{folder}/{name}" if folder else name), sents


def load_karpathy(path: Path, split: str | None = None, images_root: Path | None = None,
                  on_bad_sample: str = "error", check_decode: bool = False) -> ImageTextDataset:
    """Karpathy ``dataset_{flickr30k,coco,flickr8k}.json``: images with ``filename`` (+ ``filepath``
    for COCO), ``split`` and ``sentences[].raw``."""
    data = read_json(path)
    root = Path(images_root) if images_root else path.parent
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadSampleError(f"{path}: expected an object with an 'images' list (Karpathy format)", str(path))
    known = {im["split"] for im in data["images"] if isinstance(im, dict) and isinstance(im.get("split"), str)}
    check_split(split, known or file_split(path), path)

    def rows():
        for n, im in enumerate(data["images"]):
            if isinstance(im, dict) and not _in_split(im.get("split"), split):
                continue
            try:
                rel, sents = _karpathy_entry(im, f"{path}: images[{n}]")
            except BadSampleError as e:
                yield e
                continue
            if not sents:
                yield BadSampleError(f"{path}: images[{n}] ({rel}): no sentences", f"{path}: images[{n}]")
            for k, s in enumerate(sents):
                where = f"{path}: images[{n}].sentences[{k}]"
                if not isinstance(s, dict):
                    yield BadSampleError(f"{where}: expected an object, got {type(s).__name__}", where)
                    continue
                tokens = s.get("tokens", [])
                text = s["raw"] if "raw" in s else (" ".join(tokens) if isinstance(tokens, list)
                                                    and all(isinstance(t, str) for t in tokens) else None)
                yield rel, text, where

    name = data.get("dataset") if isinstance(data.get("dataset"), str) else path.stem
    return _assemble(root, rows(), name, split or "all", on_bad_sample, check_decode)


def load_coco_captions(path: Path, split: str | None = None, images_root: Path | None = None,
                       on_bad_sample: str = "error", check_decode: bool = False) -> ImageTextDataset:
    """COCO ``captions_*.json`` (``images[].file_name`` + ``annotations[].caption``)."""
    data = read_json(path)
    root = Path(images_root) if images_root else path.parent
    check_split(split, file_split(path), path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise BadSampleError(f"{path}: expected an object with 'images' and 'annotations' lists (COCO format)", str(path))
    files: dict[Any, str] = {}
    declared: dict[Any, int] = {}  # image id -> first images[] row
    order: list[Any] = []
    unknown: list[BadSampleError] = []
    ambiguous: set[Any] = set()
    for n, im in enumerate(data["images"]):
        where = f"{path}: images[{n}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)) or isinstance(im.get("id"), bool) \
                or not isinstance(im.get("file_name"), str) or not im["file_name"]:
            unknown.append(BadSampleError(f"{where}: expected {{id, file_name}} with a string file_name, got {im!r}"[:300], where))
            continue
        i = im["id"]
        if i in declared:
            if normalise_image_path(files.get(i, "")) != normalise_image_path(im["file_name"]) or i in ambiguous:
                ambiguous.add(i)
                unknown.append(BadSampleError(f"{where}: image id {i!r} is declared twice, as images[{declared[i]}] "
                                              f"({files.pop(i, '?')!r}) and here ({im['file_name']!r})", where))
            continue  # the same file declared twice: one image
        declared[i] = n
        files[i] = im["file_name"]
        order.append(i)
    by_image: dict[Any, list[tuple[int, Any]]] = {}
    for n, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{n}]"
        i = a.get("image_id") if isinstance(a, dict) else None
        if i in ambiguous:
            unknown.append(BadSampleError(f"{where}: image_id {i!r} is declared twice in images[]", where))
        elif not isinstance(a, dict) or i not in files:
            unknown.append(BadSampleError(f"{where}: unknown image_id {i!r}", where))
        else:
            by_image.setdefault(i, []).append((n, a.get("caption", "")))

    def rows():
        yield from unknown
        for i in order:
            for n, cap in by_image.get(i, []) if i in files else []:
                yield files[i], cap, f"{path}: annotations[{n}]"

    return _assemble(root, rows(), path.stem, split or "all", on_bad_sample, check_decode)


def load_flickr8k(folder: Path, split: str | None = None, on_bad_sample: str = "error",
                  check_decode: bool = False) -> ImageTextDataset:
    """The ``shared/data/flickr8k`` layout: ``images/``, ``captions.tsv`` (image, caption_id,
    caption) and ``splits/{train,dev,test}.txt``."""
    caps_file = folder / "captions.tsv"
    split_name = {"val": "dev"}.get(split or "", split)
    keep: list[str] | None = None
    if split_name not in (None, "all"):
        sf = folder / "splits" / f"{split_name}.txt"
        if not sf.is_file():
            check_split(split, [p.stem for p in (folder / "splits").glob("*.txt")], folder)
            raise FileNotFoundError(f"{folder}: no split file {sf}")
        keep = [line.strip() for line in sf.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
                if line.strip()]
    by_image: dict[str, list[tuple[str, str]]] = {}
    malformed: list[BadSampleError] = []
    with open(caps_file, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            where = f"{caps_file}:{n}"
            if _has_surrogates(line):
                malformed.append(BadSampleError(f"{where}: line is not valid UTF-8 text", where))
                continue
            if n == 1 and parts[0].lower() == "image":
                continue
            if not line.strip():
                continue
            if len(parts) < 3:
                malformed.append(BadSampleError(f"{where}: expected image<TAB>caption_id<TAB>caption, got {len(parts)} columns", where))
                continue
            by_image.setdefault(parts[0], []).append((parts[2], where))
    names = keep if keep is not None else list(by_image)

    def rows():
        yield from malformed
        for name in names:
            if name not in by_image:
                yield BadSampleError(f"{folder}/splits/{split_name}.txt: image {name} has no captions",
                                     f"{folder}/splits/{split_name}.txt")
                continue
            for cap, where in by_image[name]:
                yield f"images/{name}", cap, where

    return _assemble(folder, rows(), "flickr8k", split or "all", on_bad_sample, check_decode)


def load_dataset(path: str | Path, split: str | None = None, images_root: str | Path | None = None,
                 on_bad_sample: str = "error", check_decode: bool | None = None) -> ImageTextDataset:
    """Load any supported layout, detected from ``path``.

    ``on_bad_sample="skip"`` drops bad rows (and, by default, images that fail to decode) and
    records them in ``dataset.skipped``; ``"error"`` raises on the first one, naming file and row.
    """
    check = (on_bad_sample == "skip") if check_decode is None else check_decode
    from distill.core.data.wds import is_webdataset, load_webdataset

    if is_webdataset(path):
        return load_webdataset(path, split, images_root, on_bad_sample, check)
    path = Path(path)
    root = Path(images_root) if images_root else None
    if path.is_dir():
        if (path / "captions.tsv").is_file() and (path / "splits").is_dir():
            return load_flickr8k(path, split, on_bad_sample, check)
        for cand in ("captions.tsv", "captions.csv", "data.tsv", "data.csv"):
            if (path / cand).is_file():
                return load_csv(path / cand, split, root, on_bad_sample, check)
        raise FileNotFoundError(f"{path}: no captions.tsv/csv (+ splits/) found; pass a CSV/TSV/JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return load_csv(path, split, root, on_bad_sample, check)
    if suffix == ".json":
        head = read_json(path)
        if isinstance(head, dict) and "annotations" in head:
            return load_coco_captions(path, split, root, on_bad_sample, check)
        if isinstance(head, dict) and "images" in head:
            return load_karpathy(path, split, root, on_bad_sample, check)
        raise ValueError(f"{path}: JSON is neither Karpathy (images[].sentences) nor COCO captions (annotations)")
    raise ValueError(f"{path}: unsupported dataset format {suffix!r} (use .csv, .tsv, .json or a Flickr8k folder)")
