"""CSV / TSV captions files, and a folder holding one (``captions.tsv``, ``captions.csv``,
``data.tsv`` or ``data.csv``).

A header names the image column (``image``/``filepath``/``file_name``/``filename``/``path``) and
the caption column (``caption``/``title``/``text``/``sentence``), optionally ``split``; without a
recognised header the first column is the image and the last the caption. ``.tsv``/``.txt`` are
tab-separated without quoting (captions may hold bare quotes).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from distill.core.data.dataset import ImageTextDataset, assemble, check_split, file_split, in_split
from distill.core.data.formats.base import DataSource, DatasetReader, has_surrogates
from distill.core.errors import BadSampleError
from distill.core.registry import DATASET_FORMATS

#: The captions files a dataset folder may hold, in the order they are looked for.
FOLDER_FILES = ("captions.tsv", "captions.csv", "data.tsv", "data.csv")
IMAGE_COLUMNS = ("image", "filepath", "file_name", "filename", "path")
CAPTION_COLUMNS = ("caption", "title", "text", "sentence")


@DATASET_FORMATS.register("csv")
class CsvReader(DatasetReader):
    """A ``.csv``/``.tsv``/``.txt`` file, or a folder with one of :data:`FOLDER_FILES`."""

    priority = 30
    label = "CSV/TSV"
    suffixes = (".csv", ".tsv", ".txt")
    folder = " or ".join(FOLDER_FILES)

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        if source.is_dir:
            return any((source.path / name).is_file() for name in FOLDER_FILES)
        return source.is_file and source.suffix in cls.suffixes

    def file(self) -> Path:
        """The captions file: the given file, or the first of :data:`FOLDER_FILES` in the folder."""
        path = self.source.path
        if path.is_dir():
            return next(path / name for name in FOLDER_FILES if (path / name).is_file())
        return path

    def read(self) -> ImageTextDataset:
        path, split = self.file(), self.split
        tsv = path.suffix.lower() in (".tsv", ".txt")
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # a BOM is stripped  # TSV captions may contain bare quotes
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
            rows_all = read_rows(reader, path)
        if not rows_all:
            raise BadSampleError(f"{path}: empty file")
        if isinstance(rows_all[0], BadSampleError):
            raise rows_all[0]
        header = [h.strip().lower() for h in rows_all[0]]
        img_col = next((header.index(k) for k in IMAGE_COLUMNS if k in header), None)
        cap_col = next((header.index(k) for k in CAPTION_COLUMNS if k in header), None)
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
                if split_col is not None and not in_split(r[split_col].strip(), split):
                    continue
                yield r[img_col].strip(), r[cap_col], where

        return assemble(self.root(path.parent), rows(), path.stem, split or "all", self.on_bad_sample,
                        self.check_decode)


def read_rows(reader: Any, path: Path) -> list[list[str] | BadSampleError]:
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
        if any(has_surrogates(c) for c in r):
            where = f"{path}:{len(rows) + 1}"
            rows.append(BadSampleError(f"{where}: row is not valid UTF-8 text", where))
            continue
        rows.append(r)
