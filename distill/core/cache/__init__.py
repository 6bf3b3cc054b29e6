"""The teacher cache format: :mod:`~distill.core.cache.schema` (file and array names, dtypes,
manifest check), :mod:`~distill.core.cache.encode` (teacher features -> arrays),
:mod:`~distill.core.cache.writer` (shards, resume, manifest; :mod:`~distill.core.lock`: one
writer per folder), :mod:`~distill.core.cache.verify` (integrity and recomputation checks) and
:mod:`~distill.core.cache.reader` (:class:`TeacherCache`, memory-mapped reading into
:class:`~distill.core.features.TeacherTargets`)."""
from distill.core.cache.encode import (NONFINITE_MODES, OVERFLOW_MODES, ShardOutputs, TokenMode, TokenStorage,
                                       image_arrays, parse_token_mode, text_arrays)
from distill.core.lock import writer_lock
from distill.core.cache.reader import TeacherCache, bytes_per_sample
from distill.core.cache.schema import (DEFAULT_VERIFY, FORMAT_VERSION, MANIFEST, OFFSETS, SHARD_JSON, VERIFY_MODES,
                                       is_image_array, read_manifest)
from distill.core.cache.verify import check_file, verify_outputs, verify_pixels
from distill.core.cache.writer import (ShardPlan, check_existing, clear_cache, plan_shards, shard_is_complete,
                                       write_manifest, write_shard)

__all__ = ["DEFAULT_VERIFY", "FORMAT_VERSION", "MANIFEST", "NONFINITE_MODES", "OFFSETS", "OVERFLOW_MODES", "SHARD_JSON",
           "VERIFY_MODES", "ShardOutputs", "ShardPlan", "TeacherCache", "TokenMode", "TokenStorage", "bytes_per_sample",
           "check_existing", "check_file", "clear_cache", "image_arrays", "is_image_array", "parse_token_mode",
           "plan_shards", "read_manifest", "shard_is_complete", "text_arrays", "verify_outputs", "verify_pixels",
           "write_manifest", "write_shard", "writer_lock"]
