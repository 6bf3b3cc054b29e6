"""The Flickr8k folder layout (``shared/data/flickr8k``): ``images/``, ``captions.tsv`` (image,
caption_id, caption) and ``splits/{train,dev,test}.txt`` (image names; ``val`` = ``dev``). The
image root is the folder itself."""
from __future__ import annotations

from distill.core.data.dataset import ImageTextDataset, assemble, check_split
from distill.core.data.formats.base import DataSource, DatasetReader, has_surrogates
from distill.core.errors import BadSampleError
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

        # the image root is the folder itself (--images-root does not apply to this layout)
        return assemble(folder, rows(), "flickr8k", split or "all", self.on_bad_sample, self.check_decode)
