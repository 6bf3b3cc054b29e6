"""Writing a teacher cache: :mod:`~distill.pipeline.cache.settings` (:class:`CacheSettings`,
:class:`CacheJob`), :mod:`~distill.pipeline.cache.views` (the views of every image),
:mod:`~distill.pipeline.cache.teacher` (running the teacher, probe, ``--verify``),
:mod:`~distill.pipeline.cache.run` (:func:`run_cache` -> :class:`CacheResult`: teacher -> encode
-> writer) and :mod:`~distill.pipeline.cache.main` (``python -m distill.cache_teacher``). The
format itself is :mod:`distill.core.cache`."""
from distill.pipeline.cache.run import CacheResult, run_cache
from distill.pipeline.cache.settings import CacheJob, CacheSettings

__all__ = ["CacheJob", "CacheResult", "CacheSettings", "run_cache"]
