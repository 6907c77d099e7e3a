"""Errors raised by mtkd_cache.

Each subclasses a builtin so callers may catch either, and each message says which input was
wrong, what was found, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CacheCorruptError",
    "CacheExistsError",
    "CacheFormatError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "CacheWriteError",
    "InputDataError",
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


class CacheCorruptError(ValueError):
    """Stored data does not match its recorded checksum, or a chunk is missing."""


class CacheWriteError(PermissionError):
    """The destination cannot be written."""


class InputDataError(ValueError):
    """The source data given to `prepare` cannot be used as asked (missing column, empty, ...)."""
