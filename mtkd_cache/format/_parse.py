"""Small `parse_*` validators shared by the metadata classes.

Each names where the value came from, the field, the value found and what was expected, and
raises `CacheFormatError` (a `ValueError`).
"""

from __future__ import annotations

from typing import Any

from mtkd_cache.errors import CacheFormatError

__all__ = ["parse_choice", "parse_int", "parse_positive", "req"]


def req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """`d[key]`, which must exist and be of type `typ` (bools are not ints)."""
    if key not in d:
        raise CacheFormatError(f"{where}: field {key!r} is missing; the file is corrupt or not an mtkd cache")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CacheFormatError(f"{where}: field {key!r} is {value!r} ({type(value).__name__}), expected {typ}")
    return value


def parse_choice(value: Any, allowed: tuple[str, ...] | list[str], where: str) -> str:
    if value not in allowed:
        raise CacheFormatError(f"{where}: {value!r} is not one of {tuple(allowed)}")
    return str(value)


def parse_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheFormatError(f"{where} is {value!r} ({type(value).__name__}), expected an integer")
    return value


def parse_positive(value: Any, where: str) -> int:
    if parse_int(value, where) <= 0:
        raise CacheFormatError(f"{where} must be positive, got {value}")
    return int(value)
