"""Errors raised by mtkd_cache.

Each subclasses a builtin so callers may catch either, and each message says which input was
wrong, what was found, what was expected and how to fix it.
"""

from __future__ import annotations

import errno

__all__ = [
    "CacheCorruptError",
    "CacheExistsError",
    "CacheFormatError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "CacheWriteError",
    "DeviceError",
    "DiskFullError",
    "DtypeError",
    "InputDataError",
    "TeacherBusyError",
    "NonFiniteLogitsError",
    "TeacherLoadError",
    "TopKTooLargeError",
    "UnsupportedTeacherError",
]


class CacheNotFoundError(FileNotFoundError):
    """The cache, or a part of it that must exist, is not there."""


class CacheFormatError(ValueError):
    """The manifest or a metadata file is unreadable, or written in a format version we do not know."""


class CacheIncompleteError(RuntimeError):
    """A teacher or the inputs were not finished (their metadata, written last, is missing)."""


class CacheMismatchError(ValueError):
    """Settings, fingerprints or vocabularies disagree with what the cache already holds."""


class CacheExistsError(FileExistsError):
    """Something with other settings is already stored there; pass overwrite to replace it."""


class TeacherBusyError(CacheExistsError):
    """Another run is computing this teacher right now (it holds `teachers/<name>.lock`)."""


class CacheCorruptError(ValueError):
    """Stored data does not match its recorded checksum, or a chunk is missing."""


class CacheWriteError(PermissionError):
    """The destination cannot be written."""


class DiskFullError(CacheWriteError):
    """The disk (or quota) filled up while writing; the message names the file. Free space and re-run."""


class InputDataError(ValueError):
    """The source data given to `prepare` cannot be used as asked (missing column, empty, ...)."""


class TopKTooLargeError(ValueError):
    """More top-k entries were requested than the vocabulary has."""



class NonFiniteLogitsError(ValueError):
    """The teacher produced NaN or infinite logits for some samples."""



class TeacherLoadError(FileNotFoundError):
    """The teacher path, hub id, factory module or weight files could not be found."""



class UnsupportedTeacherError(ValueError):
    """The teacher exists but is not a kind precompute can run, or lacks a requested feature."""



class DeviceError(ValueError):
    """A ``--device`` value that is malformed or names a device this machine does not have."""



class DtypeError(ValueError):
    """A ``--dtype`` value that is not one of the supported precisions."""


def write_error(e: OSError, url: str, what: str) -> OSError:
    """`e` as a one-line `CacheWriteError` (`DiskFullError` for ENOSPC) naming the file and the fix.

    Returns `e` itself when it is not a failed write (a missing input, an mtkd error already
    worded for the user), so callers re-raise it unchanged.
    """
    cause = e if e.errno is not None else e.__cause__
    if not isinstance(cause, OSError) or cause.errno is None or isinstance(e, (CacheNotFoundError, DiskFullError)):
        return e
    where = cause.filename or url
    if cause.errno == errno.ENOSPC:
        return DiskFullError(
            f"disk full while {what}: cannot write {where}; free space on that disk (or move the cache) "
            f"and re-run the same command: committed work is kept and only the rest is computed")
    if isinstance(e, CacheWriteError):
        return e
    return CacheWriteError(f"{what}: cannot write {where} ({cause.strerror}); fix the destination and "
                           f"re-run the same command: committed work is kept")
