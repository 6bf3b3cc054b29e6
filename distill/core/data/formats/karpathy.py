"""Karpathy split JSON (``dataset_{flickr8k,flickr30k,coco}.json``): ``images[]`` with
``filename`` (+ ``filepath`` for COCO), ``split`` (``train``/``restval``/``val``/``test``) and
``sentences[].raw`` (or ``tokens``)."""
from __future__ import annotations

from typing import Any

from distill.core.data.dataset import ImageTextDataset, assemble, check_split, file_split, in_split
from distill.core.data.formats.base import DataSource, DatasetReader
from distill.core.errors import BadSampleError
from distill.core.registry import DATASET_FORMATS


@DATASET_FORMATS.register("karpathy")
class KarpathyReader(DatasetReader):
    """A JSON object with an ``images`` list and no ``annotations`` (that is COCO captions)."""

    priority = 40
    label = "Karpathy JSON (images[].sentences)"
    suffixes = (".json",)

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        data = source.json_object()
        return data is not None and "images" in data and "annotations" not in data

    def read(self) -> ImageTextDataset:
        path, split = self.source.path, self.split
        data = self.source.json
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise BadSampleError(f"{path}: expected an object with an 'images' list (Karpathy format)", str(path))
        known = {im["split"] for im in data["images"] if isinstance(im, dict) and isinstance(im.get("split"), str)}
        check_split(split, known or file_split(path), path)

        def rows():
            for n, im in enumerate(data["images"]):
                if isinstance(im, dict) and not in_split(im.get("split"), split):
                    continue
                try:
                    rel, sents = karpathy_entry(im, f"{path}: images[{n}]")
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
        return assemble(self.root(), rows(), name, split or "all", self.on_bad_sample, self.check_decode)


def karpathy_entry(im: Any, where: str) -> tuple[str, list[Any]]:
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
