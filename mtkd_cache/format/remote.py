"""Remote reads and writes that survive a flaky network, and a local read-through cache of chunks.

Retries: a transient failure (connection reset or refused mid-way, a timeout, an HTTP 5xx or 429)
is retried up to `RETRIES` times with exponential backoff (`BACKOFF` s doubling, capped at
`MAX_BACKOFF` s, with jitter); anything else (missing, forbidden, bad request) fails at once. Every
remote call of `CacheStore` and of its zarr store goes through `retry` / `aretry`, the one place.

Chunk cache: a remote store opened for reading keeps the shards (chunk objects) it downloads in a
local folder, `$MTKD_CHUNK_CACHE` (default `~/.cache/mtkd/chunks`), up to `$MTKD_CHUNK_CACHE_BYTES`
(default 2 GiB, 0 = off). A shard is fetched whole once, stored with the blake2b of its bytes, and
served from disk afterwards, so a second epoch does not download again. On use the bytes are
hashed again and a copy that does not match is dropped and fetched anew; zarr then checks each
inner chunk's crc32c (format/codecs.py) as for any download. Least recently used shards are
evicted when the folder exceeds its limit. The folder's key includes a tag of the content (the
teacher's hash or the inputs' fingerprint), so a re-run teacher is never served stale bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

__all__ = ["ChunkCache", "RemoteZarrStore", "aretry", "chunk_cache", "is_transient", "retry"]

T = TypeVar("T")
RETRIES = 6
BACKOFF = 0.05
MAX_BACKOFF = 2.0
DEFAULT_CACHE_BYTES = 2 << 30
_TRANSIENT_TEXT = ("service unavailable", "slowdown", "slow down", "internalerror", "internal server error",
                   "bad gateway", "gateway timeout", "connection reset", "server disconnected",
                   "connection closed", "connection aborted", "remote end closed")


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)  # botocore.ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _transient_one(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(e, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return True
    status = _status(e)
    if status is not None:
        return status >= 500 or status == 429
    name = type(e).__name__  # aiohttp / botocore / urllib3 connection errors, without importing them
    if name in {"ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
                "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ProtocolError", "IncompleteRead", "RemoteDisconnected", "ResponseParserError"}:
        return True
    return any(t in str(e).lower() for t in _TRANSIENT_TEXT)


def is_transient(e: BaseException) -> bool:
    """Whether `e` (or an error it was raised from) is worth retrying: network drops, 5xx, 429."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, FileNotFoundError | PermissionError):
            return False
        if _transient_one(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _delay(attempt: int) -> float:
    return min(MAX_BACKOFF, BACKOFF * 2 ** attempt) * (0.5 + random.random() / 2)


def retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on transient errors with bounded exponential backoff."""
    for attempt in range(RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == RETRIES - 1 or not is_transient(e):
                raise
            time.sleep(_delay(attempt))
    raise AssertionError("unreachable")


async def aretry(fn: Callable[[], Awaitable[T]]) -> T:
    """`await fn()`, retried on transient errors with bounded exponential backoff."""
    for attempt in range(RETRIES):
        try:
            return await fn()
        except Exception as e:
            if attempt == RETRIES - 1 or not is_transient(e):
                raise
            await asyncio.sleep(_delay(attempt))
    raise AssertionError("unreachable")


class ChunkCache:
    """A folder of downloaded shards, at most `limit` bytes, least recently used evicted first.

    Files are written under a temporary name and renamed, so concurrent processes (data loader
    workers) see whole files or none. Each file's name ends with the blake2b of its bytes.
    """

    def __init__(self, root: str | os.PathLike[str], limit: int):
        self.root, self.limit = Path(root), int(limit)

    def _dir(self, namespace: str, key: str) -> Path:
        h = hashlib.blake2b(f"{namespace}\0{key}".encode(), digest_size=16).hexdigest()
        return self.root / h[:2] / h

    def get(self, namespace: str, key: str) -> bytes | None:
        """The cached bytes, or None when absent or when they no longer match their hash."""
        folder = self._dir(namespace, key)
        try:
            (name,) = [p for p in os.listdir(folder) if not p.startswith(".")]
            data = (folder / name).read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        if hashlib.blake2b(data, digest_size=16).hexdigest() != name:
            self._drop(folder)  # damaged on disk: fetch anew
            return None
        os.utime(folder / name)  # recency for LRU eviction
        return data

    def put(self, namespace: str, key: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        folder = self._dir(namespace, key)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b(data, digest_size=16).hexdigest()
        tmp = folder / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
        self._evict()

    def _drop(self, folder: Path) -> None:
        for p in folder.glob("*"):
            p.unlink(missing_ok=True)

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.root.glob("*/*/*"):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def size(self) -> int:
        return sum(s for _, s, _ in self._files())

    def _evict(self) -> None:
        files = self._files()
        total = sum(s for _, s, _ in files)
        for _, s, p in files:  # oldest use first
            if total <= self.limit:
                break
            p.unlink(missing_ok=True)
            total -= s


def chunk_cache() -> ChunkCache | None:
    """The process's chunk cache from the environment, or None when `MTKD_CHUNK_CACHE_BYTES=0`."""
    limit = int(os.environ.get("MTKD_CHUNK_CACHE_BYTES", DEFAULT_CACHE_BYTES))
    if limit <= 0:
        return None
    root = os.environ.get("MTKD_CHUNK_CACHE") or Path.home() / ".cache" / "mtkd" / "chunks"
    return ChunkCache(root, limit)


def _slice(data: bytes, byte_range: Any) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:] if byte_range.suffix else b""
    raise TypeError(f"unknown byte range {byte_range!r}")


class RemoteZarrStore(WrapperStore):  # type: ignore[type-arg]
    """A zarr store over an fsspec store: retried calls and (read-only, with a cache) cached shards.

    Args:
        store: The zarr store of the remote root.
        cache: Where downloaded shards are kept, or None for no caching.
        namespace: The remote URL plus a content tag; cached shards are keyed by it.
    """

    def __init__(self, store: Any, cache: ChunkCache | None = None, namespace: str = ""):
        super().__init__(store)
        self._cache, self._namespace = cache, namespace

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if self._cache is None or "/c/" not in f"/{key}":
            return await aretry(lambda: self._store.get(key, prototype, byte_range))
        data = await asyncio.to_thread(self._cache.get, self._namespace, key)
        if data is None:
            whole = await aretry(lambda: self._store.get(key, prototype, None))
            if whole is None:
                return None
            data = whole.to_bytes()
            await asyncio.to_thread(self._cache.put, self._namespace, key, data)
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def set(self, key: str, value: Any) -> None:
        await aretry(lambda: self._store.set(key, value))

    async def exists(self, key: str) -> bool:
        return await aretry(lambda: self._store.exists(key))

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await aretry(lambda: self._store.set_if_not_exists(key, value))

    async def delete(self, key: str) -> None:
        await aretry(lambda: self._store.delete(key))

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]
