"""The base class of every dataset format reader, and what the readers share.

A format is a :class:`DatasetReader` subclass registered under its name with
``@DATASET_FORMATS.register("name")`` (:mod:`distill.core.registry`). The factory
(:mod:`distill.core.data.factory`) asks the registered readers, in ascending ``priority`` (then
name), whether they :meth:`~DatasetReader.accepts` the ``--data`` argument, builds the first that
does and calls :meth:`~DatasetReader.read`, which returns an
:class:`~distill.core.data.dataset.ImageTextDataset` (usually through
:func:`~distill.core.data.dataset.assemble`, which validates every row).

A plugin (``--plugin my_formats``) adds a format the same way::

    @DATASET_FORMATS.register("jsonl")
    class JsonlReader(DatasetReader):
        priority, label, suffixes = 60, "JSON lines", (".jsonl",)

        @classmethod
        def accepts(cls, source):
            return source.is_file and source.suffix == ".jsonl"

        def read(self):
            rows = ...  # (image, caption, "file:line") tuples
            return assemble(self.root(), rows, self.source.path.stem, self.split or "all",
                            self.on_bad_sample, self.check_decode)
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from distill.core.data.dataset import ImageTextDataset
from distill.core.errors import BadSampleError


class DataSource:
    """The ``--data`` argument as the readers see it: the spec as given (a path, or a pattern such as
    ``shards/{000..009}.tar``), its path and, parsed once on demand, a JSON file's content (two JSON
    formats sniff the same file, and the chosen one reads it without parsing it again)."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = spec
        self.path = Path(spec)

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def is_file(self) -> bool:
        return self.path.is_file()

    @property
    def suffix(self) -> str:
        """The file suffix, lower case (``".json"``)."""
        return self.path.suffix.lower()

    @cached_property
    def json(self) -> Any:
        """The parsed JSON file (see :func:`read_json`)."""
        return read_json(self.path)

    def json_object(self) -> dict[str, Any] | None:
        """The parsed file when it is a ``.json`` file holding an object (what the JSON formats sniff),
        else None."""
        if not (self.is_file and self.suffix == ".json"):
            return None
        return self.json if isinstance(self.json, dict) else None

    def __str__(self) -> str:
        return str(self.spec)


class DatasetReader:
    """One dataset format. Subclasses set the class attributes and implement :meth:`accepts` and
    :meth:`read`; the constructor keeps the load options."""

    #: Sniffing order: readers are asked in ascending priority (then name); the built-in formats
    #: use 10..50, so a plugin's default of 100 is asked after them.
    priority: ClassVar[int] = 100
    #: What the format is, for messages ("Karpathy JSON (images[].sentences)").
    label: ClassVar[str] = ""
    #: File suffixes the format reads (lower case): a file of such a suffix that no reader accepts
    #: is reported as "neither <label> nor <label>".
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: What the format looks for in a folder ("captions.tsv + splits/"), "" when it reads no folder.
    folder: ClassVar[str] = ""

    def __init__(self, source: DataSource | str | Path, split: str | None = None,
                 images_root: str | Path | None = None, on_bad_sample: str = "error",
                 check_decode: bool = False) -> None:
        self.source = source if isinstance(source, DataSource) else DataSource(source)
        self.split = split
        self.images_root = Path(images_root) if images_root else None
        self.on_bad_sample = on_bad_sample
        self.check_decode = check_decode

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        """Whether this format reads ``source`` (cheap checks; may parse ``source.json``)."""
        raise NotImplementedError

    def read(self) -> ImageTextDataset:
        """Load the dataset (bad rows raise :class:`BadSampleError` or are skipped, per ``on_bad_sample``)."""
        raise NotImplementedError

    def root(self, default: Path | None = None) -> Path:
        """The image root: ``--images-root`` when given, else ``default`` (by default the folder of
        the data file)."""
        if self.images_root is not None:
            return self.images_root
        return default if default is not None else self.source.path.parent


def read_json(path: Path) -> Any:
    """Parse a JSON dataset file; broken JSON or non-UTF-8 bytes raise :class:`BadSampleError`
    naming the file and position (a whole-file error: not skippable)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8-sig"))  # a byte order mark is stripped
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{path}: byte {e.start}: not valid UTF-8 ({e.reason})", str(path)) from e
    except json.JSONDecodeError as e:
        raise BadSampleError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg} (char {e.pos})", str(path)) from e


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, under errors="surrogateescape"


def has_surrogates(text: str) -> bool:
    """Whether ``text`` (read with ``errors="surrogateescape"``) holds bytes that were not UTF-8."""
    return _UNDECODABLE.search(text) is not None
