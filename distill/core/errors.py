"""The project's one error hierarchy.

Library code raises these typed errors and nothing else for bad input (never ``SystemExit``); only
the command-line layer (:mod:`distill.pipeline.cli`) turns a :class:`DistillError` (and a few
standard ``OSError``\\s) into one ``error: ...`` line and exit status 2. Every class keeps the
standard base it had before the hierarchy existed (``ValueError``, ``KeyError``, ``RuntimeError``,
``TypeError``), so ``except ValueError`` in user code still catches what it caught.

    DistillError
    ├── ConfigError (ValueError)            settings, config files, overrides, flags
    │   ├── UnknownNameError (KeyError)     an unregistered teacher/student/loss/balancer/format
    │   ├── SplitError → NoSplitsError      --split names no split of the dataset
    │   └── ProjectionInitError             train.init_projections impossible for this student
    ├── DataError (ValueError)
    │   ├── BadSampleError                  one unusable dataset row (file and row named)
    │   └── DatasetMismatchError            a cache built from another dataset/split
    ├── CacheError
    │   ├── CacheCorruptError → ManifestError, NonFiniteTargetError
    │   ├── CacheMismatchError → StaleCacheError
    │   ├── CacheWriteError → CacheLockedError, NonFiniteOutputError, FP16OverflowError
    │   ├── CacheVerifyError
    │   └── PixelCacheError
    ├── CheckpointError (RuntimeError)
    │   ├── CheckpointCorruptError, ResumeMismatchError, RunFolderError → RunLockedError
    │   └── StudentFileError (also ValueError)   a saved student (folder or checkpoint) cannot be loaded
    └── ExportError (TypeError) → HFExportError
"""
from __future__ import annotations


class DistillError(Exception):
    """Base of every error this project raises on purpose (bad input, bad files, bad settings)."""


# -- settings ---------------------------------------------------------------------------------------
class ConfigError(DistillError, ValueError):
    """A config file, preset, override or flag is malformed."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered (a ``KeyError`` for lookups, a ``ValueError`` for the CLI)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SplitError(ConfigError):
    """``--split`` names a split the dataset does not have."""


class NoSplitsError(SplitError):
    """``--split`` was given for a dataset format (file) that has no splits."""


class ProjectionInitError(ConfigError):
    """The student or the settings do not allow a least-squares projection start."""


# -- data -------------------------------------------------------------------------------------------
class DataError(DistillError, ValueError):
    """A dataset cannot be used as given."""


class BadSampleError(DataError):
    """A row of the dataset cannot be used; the message names the file and row (``where``)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where or message.split(": ", 1)[0]


class DatasetMismatchError(DataError):
    """The cache was not built from the given dataset/split."""


# -- teacher cache ----------------------------------------------------------------------------------
class CacheError(DistillError):
    """Base class of every cache error."""


class CacheCorruptError(CacheError):
    """A cache file is missing, truncated or does not match its recorded checksum."""


class ManifestError(CacheCorruptError):
    """``manifest.json`` is missing, is not valid JSON or lacks required fields."""


class NonFiniteTargetError(CacheCorruptError):
    """A cached teacher target (embedding, tokens, intermediate) holds NaN or Inf."""


class CacheMismatchError(CacheError):
    """The cache was written for a different teacher, dataset or storage settings."""


class StaleCacheError(CacheMismatchError):
    """Image files changed (size or modification time) after the cache was built."""


class CacheWriteError(CacheError):
    """Writing a shard or the manifest failed (e.g. the disk is full)."""


class CacheLockedError(CacheWriteError):
    """Another process is writing into the same cache folder."""


class NonFiniteOutputError(CacheWriteError):
    """The teacher produced NaN/Inf (``--nonfinite error``)."""


class FP16OverflowError(CacheWriteError):
    """A teacher output does not fit fp16 (``--overflow error``)."""


class CacheVerifyError(CacheError):
    """Recomputed teacher outputs disagree with the cached ones."""


class PixelCacheError(CacheError):
    """The cache holds no pixels (``data.pixels=cache``) or its pixel arrays are unusable."""


# -- checkpoints ------------------------------------------------------------------------------------
class CheckpointError(DistillError, RuntimeError):
    """A checkpoint is missing, unreadable or not a training checkpoint (e.g. contains pickled code)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's content does not match its stored checksum (or it cannot be read at all)."""


class ResumeMismatchError(CheckpointError):
    """The checkpoint was written for another student, teacher cache or dataset than the run resumes with."""


class RunFolderError(CheckpointError):
    """The output folder already holds a training run and neither ``--resume`` nor ``--overwrite`` was
    given, holds a log but no checkpoint to resume from, or ``--out`` is not a folder."""


class RunLockedError(RunFolderError):
    """Another live process is writing into the same run (or LiT/export) folder (``writer.lock``)."""


class StudentFileError(CheckpointError, ValueError):
    """A saved student (a student folder or a training checkpoint) is unreadable, holds no student or
    is corrupt. Also a ``ValueError``, which these files raised before the hierarchy existed."""


# -- export -----------------------------------------------------------------------------------------
class ExportError(DistillError, TypeError):
    """A student cannot be exported to the requested format."""


class HFExportError(ExportError):
    """The student's architecture has no ``CLIPModel`` equivalent."""
