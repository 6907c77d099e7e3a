"""Errors raised by the training data stream.

Each subclasses a builtin so callers may catch either, and each message names the input, the
value found, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "IncompleteTeacherError",
    "StreamConfigError",
    "StreamStateError",
    "TeacherMismatchError",
    "TeacherNotFoundError",
]


class TeacherNotFoundError(LookupError):
    """A requested teacher (or one of its feature layers) is not in the cache."""


class IncompleteTeacherError(TeacherNotFoundError):
    """A requested teacher exists on storage but its run never finished."""


class TeacherMismatchError(ValueError):
    """Teachers disagree with each other or with the student (fingerprints, vocabulary, grid)."""


class StreamConfigError(ValueError):
    """An argument of the data stream (batch size, rank, seed, ...) is out of range."""


class StreamStateError(ValueError):
    """A saved stream state cannot be resumed by this stream (other seed, data or order)."""
