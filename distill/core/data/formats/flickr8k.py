"""The Flickr8k folder layout (``shared/data/flickr8k``): ``images/``, ``captions.tsv`` (image,
caption_id, caption) and ``splits/{train,dev,test}.txt`` (image names; ``val`` = ``dev``). The
image root is the folder itself: ``--images-root`` is refused (as for webdataset shards), an image
listed twice in a split file is a bad row naming both rows, and a UTF-8 byte order mark is
stripped."""
from __future__ import annotations

from distill.core.data.dataset import ImageTextDataset, assemble, check_split
from distill.core.data.formats.base import DataSource, DatasetReader, has_surrogates
from distill.core.errors import BadSampleError, ConfigError
from distill.core.registry import DATASET_FORMATS


@DATASET_FORMATS.register("flickr8k")
class Flickr8kReader(DatasetReader):
    """A folder with ``captions.tsv`` and ``splits/``."""

    priority = 20
    label = "Flickr8k folder"
    folder = "captions.tsv + splits/"

    @classmethod
    def accepts(cls, source: DataSource) -> bool:
        return source.is_dir and (source.path / "captions.tsv").is_file() and (source.path / "splits").is_dir()

    def read(self) -> ImageTextDataset:
        folder, split = self.source.path, self.split
        if self.images_root is not None:
            raise ConfigError(f"{folder}: --images-root does not apply to a Flickr8k folder (its images are "
                              f"{folder / 'images'}); link or move the images there, or pass a CSV/TSV file")
        caps_file = folder / "captions.tsv"
        split_name = {"val": "dev"}.get(split or "", split)
        keep: list[tuple[str, str]] | None = None  # (image name, "file:row")
        if split_name not in (None, "all"):
            sf = folder / "splits" / f"{split_name}.txt"
            if not sf.is_file():
                check_split(split, [p.stem for p in (folder / "splits").glob("*.txt")], folder)
                raise FileNotFoundError(f"{folder}: no split file {sf}")
            lines = sf.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()
            keep = [(line.strip(), f"{sf}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
        by_image: dict[str, list[tuple[str, str]]] = {}
        malformed: list[BadSampleError] = []
        with open(caps_file, encoding="utf-8-sig", errors="surrogateescape") as f:
            for n, line in enumerate(f, start=1):
                parts = line.rstrip("\n").split("\t")
                where = f"{caps_file}:{n}"
                if has_surrogates(line):
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
        names = keep if keep is not None else [(name, by_image[name][0][1]) for name in by_image]

        def rows():
            yield from malformed
            listed: dict[str, str] = {}
            for name, listed_at in names:
                if name in listed:
                    yield BadSampleError(f"{listed_at}: image {name} is listed twice (first at {listed[name]}); "
                                         "its captions would count twice", listed_at)
                    continue
                listed[name] = listed_at
                if name not in by_image:
                    yield BadSampleError(f"{listed_at}: image {name} has no captions", listed_at)
                    continue
                for cap, where in by_image[name]:
                    yield f"images/{name}", cap, where

        # the image root is the folder itself (--images-root does not apply to this layout)
        return assemble(folder, rows(), "flickr8k", split or "all", self.on_bad_sample, self.check_decode)
