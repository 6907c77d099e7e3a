"""Read-time integrity: every read checks what it reads and fails with one line naming it.

Three layers, in the order a read meets them:
1. An absent shard raises (`StrictStore`): every shard is written, so absent means lost, never
   zarr's fill value 0.
2. Every inner zarr chunk carries a crc32c of its compressed bytes (`chunk_codecs`), so a
   flipped byte fails the decode. Cost: measured in benchmarks/read_integrity.py.
3. The decoded rows pass their kind's `check` (ids in [0, vocab) and ascending, log-probs
   <= 0, tail in [0, 1], counts summing to draws).
A teacher is opened only when its `teacher.json` names its folder and hashes to the value its
`chunks.parquet` recorded (`check_teacher_json`). Any failure becomes one `CacheCorruptError`
naming teacher, array, chunk and file and the repair command.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtkd_cache.errors import CacheCorruptError, CacheNotFoundError
from mtkd_cache.format.layout import ChunkGrid, chunk_of_row, shard_key
from mtkd_cache.format.meta import TEACHER_HASH_KEY, content_hash
from mtkd_cache.format.store import CacheStore, MissingChunkError

__all__ = ["check_teacher_json", "inputs_fix", "read_rows", "teacher_fix"]


def teacher_fix(url: str, teacher: str) -> str:
    return (f"repair with `mtkd-cache verify --repair {url}`, then re-run `mtkd-cache run` for teacher "
            f"{teacher!r} (only the damaged chunks are recomputed)")


def metadata_error(path: str, error: Exception, fix: str) -> CacheCorruptError:
    """A damaged zarr.json (invalid JSON, an unknown codec, inconsistent shapes) as a one-line error."""
    first = (str(error).splitlines() or [""])[0][:160]
    return CacheCorruptError(f"{path} is damaged ({type(error).__name__}: {first}); {fix}")


def teacher_metadata_fix(url: str, teacher: str) -> str:
    return (f"restore it from a copy of the cache, or re-run `mtkd-cache run --overwrite` for teacher {teacher!r} "
            f"on {url} (array metadata cannot be repaired chunk by chunk)")


def inputs_fix(url: str) -> str:
    return (f"the inputs of {url} are damaged: restore them from a copy, or re-create them with "
            f"`mtkd-cache prepare --overwrite` (teachers must then be re-run)")


def _problem(e: BaseException) -> str:
    if isinstance(e, MissingChunkError):
        return "the chunk is missing (its shard was deleted or never written)"
    text = " ".join(str(e).split())[:200]
    if "checksum" in text.lower():
        return "checksum mismatch: the stored bytes changed"
    return f"unreadable ({type(e).__name__}: {text})"


def _chunk_of(e: BaseException, grid: ChunkGrid, row: int, on: str) -> int:
    if isinstance(e, MissingChunkError):
        parts = e.key.split("/c/", 1)[-1].split("/")
        if parts and parts[0].isdigit():
            return int(parts[0])
    return chunk_of_row(grid, row, on)


def corrupt_error(store: CacheStore, owner: str, array_key: str, array: str, chunk: int, ndim: int,
                  problem: str, fix: str) -> CacheCorruptError:
    """The one-line error for damaged data: owner, array, chunk, file, what is wrong and the fix."""
    file = store.path(shard_key(array_key, chunk, ndim))
    return CacheCorruptError(f"{owner} array {array!r} chunk {chunk} ({file}): {problem}; {fix}")


def read_rows(store: CacheStore, arr: Any, *, owner: str, group_key: str, name: str, start: int, stop: int,
              grid: ChunkGrid, on: str, fix: str) -> np.ndarray:
    """Rows [start, stop) of zarr array `arr`; a missing or damaged chunk raises `CacheCorruptError`."""
    try:
        return np.asarray(arr[start:stop])
    except Exception as e:  # a damaged shard surfaces as a codec error of any type (zstd, crc32c, index)
        chunk = _chunk_of(e, grid, start, on)
        raise corrupt_error(store, owner, f"{group_key}/{name}", name, chunk, len(arr.shape), _problem(e), fix) from e


def check_teacher_json(store: CacheStore, folder: str, raw: dict[str, Any]) -> None:
    """Refuse a teacher.json that names another teacher or differs from what was written and verified.

    Raises:
        CacheCorruptError: `name` is not the folder's, `chunks.parquet` is missing, or the
            sha256 of teacher.json's canonical JSON is not the one recorded in `chunks.parquet`.
    """
    key = f"teachers/{folder}"
    if raw.get("name") != folder:
        raise CacheCorruptError(
            f"{store.path(key + '/teacher.json')} names teacher {raw.get('name')!r}, but it lies in the folder of "
            f"{folder!r}: refusing to serve another teacher's arrays; {teacher_fix(store.url, folder)}")
    try:
        schema = pq.read_schema(io.BytesIO(store.read_bytes(f"{key}/chunks.parquet")))
        recorded = (schema.metadata or {}).get(TEACHER_HASH_KEY.encode(), b"").decode()
    except (CacheNotFoundError, pa.ArrowException, OSError) as e:
        raise CacheCorruptError(f"teacher {folder!r}: {store.path(key + '/chunks.parquet')} is missing or "
                                f"unreadable ({type(e).__name__}); {teacher_fix(store.url, folder)}") from e
    if recorded != content_hash(raw):
        raise CacheCorruptError(
            f"teacher {folder!r}: {store.path(key + '/teacher.json')} was changed after the teacher was written "
            f"(its sha256 differs from the one in chunks.parquet); {teacher_fix(store.url, folder)}")
