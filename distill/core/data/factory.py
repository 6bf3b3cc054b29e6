"""Build the reader of a ``--data`` argument and load the dataset (model: timm's ``reader_factory``).

:func:`create_reader` finds the format by asking every registered reader of
:data:`~distill.core.registry.DATASET_FORMATS` (built-ins: :mod:`distill.core.data.formats`;
plugins add their own), in ascending ``priority`` then name, whether it
:meth:`~distill.core.data.formats.base.DatasetReader.accepts` the argument, and builds the first
that does (or the one named by ``format``). :func:`load_dataset` reads it.
"""
from __future__ import annotations

from pathlib import Path

from distill.core.errors import DataError
from distill.core.data.dataset import ImageTextDataset
from distill.core.data.formats.base import DataSource, DatasetReader
from distill.core.registry import DATASET_FORMATS


def reader_classes() -> list[type[DatasetReader]]:
    """Every registered reader class, in the order they are asked (ascending ``priority``, then name)."""
    classes = [(name, DATASET_FORMATS.get(name)) for name in DATASET_FORMATS.names()]
    return [cls for _, cls in sorted(classes, key=lambda item: (item[1].priority, item[0]))]


def find_format(source: DataSource) -> type[DatasetReader]:
    """The first reader class that accepts ``source``; otherwise the error the path calls for
    (``FileNotFoundError`` for a missing path or a folder no format reads, ``ValueError`` for a
    file no format reads)."""
    classes = reader_classes()
    for cls in classes:
        if cls.accepts(source):
            return cls
    path = source.path
    if path.is_dir():
        looked = "; ".join(f"{c.folder} ({c.label})" for c in classes if c.folder)
        raise FileNotFoundError(f"{path}: no dataset found in this folder (looked for {looked}); "
                                "pass a CSV/TSV/JSON file")
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    suffix = source.suffix
    claimed = [c.label for c in classes if suffix in c.suffixes]
    if claimed:
        raise DataError(f"{path}: the file is neither {' nor '.join(claimed)}" if len(claimed) > 1
                         else f"{path}: the file is not {claimed[0]}")
    known = ", ".join(s for c in classes for s in c.suffixes)
    raise DataError(f"{path}: unsupported dataset format {suffix!r} (use {known} or a dataset folder)")


def create_reader(path: str | Path, split: str | None = None, images_root: str | Path | None = None,
                  on_bad_sample: str = "error", check_decode: bool | None = None,
                  format: str | None = None) -> DatasetReader:
    """The reader of ``path`` (a file, folder or shard pattern) in format ``format`` (a registered
    name; None: the first format that accepts ``path``). ``check_decode`` None decodes every image
    while loading exactly when ``on_bad_sample="skip"``."""
    check = (on_bad_sample == "skip") if check_decode is None else check_decode
    source = DataSource(path)
    cls = DATASET_FORMATS.get(format) if format is not None else find_format(source)
    return cls(source, split, images_root, on_bad_sample, check)


def load_dataset(path: str | Path, split: str | None = None, images_root: str | Path | None = None,
                 on_bad_sample: str = "error", check_decode: bool | None = None) -> ImageTextDataset:
    """Load any supported layout, detected from ``path``.

    ``on_bad_sample="skip"`` drops bad rows (and, by default, images that fail to decode) and
    records them in ``dataset.skipped``; ``"error"`` raises on the first one, naming file and row.
    """
    return create_reader(path, split, images_root, on_bad_sample, check_decode).read()
