"""COCO captions JSON (``captions_train2017.json``, ...): ``images[].{id, file_name}`` and
``annotations[].{image_id, caption}``. The file has no splits, except the one its name names
(``captions_val2017.json`` is ``val``)."""
from __future__ import annotations

from typing import Any

from distill.core.data.dataset import ImageTextDataset, assemble, check_split, file_split, normalise_image_path
from distill.core.data.formats.base import DataSource, DatasetReader
from distill.core.errors import BadSampleError
from distill.core.registry import DATASET_FORMATS


@DATASET_FORMATS.register("coco")
class CocoCaptionsReader(DatasetReader):
    """A JSON object with an ``annotations`` key."""

    priority = 50
    label = "COCO captions JSON (annotations)"
    suffixes = (".json",)

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        data = source.json_object()
        return data is not None and "annotations" in data

    def read(self) -> ImageTextDataset:
        path = self.source.path
        data = self.source.json
        check_split(self.split, file_split(path), path)
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

        return assemble(self.root(), rows(), path.stem, self.split or "all", self.on_bad_sample, self.check_decode)
