"""The built-in dataset formats, one module each; importing this package registers them in
:data:`distill.core.registry.DATASET_FORMATS` (it is that registry's ``provider``).

In the order the factory asks them (``priority``):

==========  ============  ========================================================================
priority    name          reads
==========  ============  ========================================================================
10          webdataset    ``.tar`` shards, brace patterns, a folder of ``*.tar`` (:mod:`.webdataset`)
20          flickr8k      a folder with ``captions.tsv`` + ``splits/`` (:mod:`.flickr8k`)
30          csv           ``.csv``/``.tsv``/``.txt``, a folder with ``captions.tsv`` etc. (:mod:`.csv_tsv`)
40          karpathy      Karpathy split JSON (:mod:`.karpathy`)
50          coco          COCO captions JSON (:mod:`.coco`)
==========  ============  ========================================================================

A plugin registers more with ``@DATASET_FORMATS.register(name)`` on a
:class:`~distill.core.data.formats.base.DatasetReader` subclass.
"""
from __future__ import annotations

from distill.core.data.formats import coco, csv_tsv, flickr8k, karpathy, webdataset  # registration side effects
from distill.core.data.formats.base import DataSource, DatasetReader

__all__ = ["DataSource", "DatasetReader", "coco", "csv_tsv", "flickr8k", "karpathy", "webdataset"]
