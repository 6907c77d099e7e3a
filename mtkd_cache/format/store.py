"""Where a cache lives: a local folder or any fsspec URL, seen through one small interface.

JSON files are written whole (temporary name + rename on local disks, a single PUT on object
stores), so a reader sees either the old or the new file, never half of one. Zarr arrays go
through `zarr.storage.LocalStore` for local paths and `FsspecStore` for everything else.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.storage
from zarr.storage import WrapperStore

from mtkd_cache.errors import (
    CacheCorruptError,
    CacheFormatError,
    CacheNotFoundError,
    CacheWriteError,
)
from mtkd_cache.format.remote import ChunkCache, RemoteZarrStore, chunk_cache, retry

__all__ = ["CacheStore", "MissingChunkError", "StrictStore", "now_iso"]


class MissingChunkError(KeyError):
    """A zarr chunk (shard) key that the array's metadata implies is absent from storage."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class StrictStore(WrapperStore):  # type: ignore[type-arg]
    """A read-only zarr store on which an absent chunk key raises `MissingChunkError`.

    zarr returns the fill value for a chunk it cannot find. Every shard of an mtkd array is
    written (`write_empty_chunks`), so an absent one was lost: this wrapper turns the silent
    fill into an error at no extra I/O (the `get` happens anyway).
    """

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        got = await self._store.get(key, prototype, byte_range)
        if got is None and "/c/" in f"/{key}":
            raise MissingChunkError(key)
        return got


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CacheStore:
    """A cache root: `url` is a path or an fsspec URL (`file://`, `memory://`, `s3://`, ...)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") if root != "/" else root
        self.protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in self.protocols

    def __repr__(self) -> str:
        return f"CacheStore({self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    # -- files -----------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """Whether `key` exists. Not `fs.exists`: fsspec's HTTP one answers False on any error (a 503
        would read as "absent"); `info` raises, so transient errors are retried and only a
        missing object is False."""
        try:
            retry(self.fs.info, self.path(key))
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        try:
            return bytes(retry(self.fs.cat_file, self.path(key)))
        except FileNotFoundError as e:
            raise CacheNotFoundError(f"{self.url}: {key} does not exist") from e

    def read_shard(self, key: str, tag: str = "") -> bytes:
        """`read_bytes` of a shard, through the local chunk cache for remote data with a content `tag`.

        The same cache, namespace and keys as the zarr path (`zarr_store`), so whole-shard reads
        (format/shards.py) and zarr reads share downloads. Cached bytes are checked against their
        hash on use (`ChunkCache.get`); the caller checks every inner chunk's crc32c.
        """
        cache = self._chunk_cache(tag)
        if cache is None:
            return self.read_bytes(key)
        data = cache.get(self._namespace(tag), key)
        if data is None:
            data = self.read_bytes(key)
            cache.put(self._namespace(tag), key, data)
        return data

    def _chunk_cache(self, tag: str) -> ChunkCache | None:
        """The local chunk cache for this store's read-only data with content `tag`: remote stores
        only (not local disks, not `memory://`), and only data with a tag."""
        return chunk_cache() if tag and not self.is_local and "memory" not in self.protocols else None

    def _namespace(self, tag: str) -> str:
        return f"{self.url}\0{tag}"

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        try:
            if self.is_local:
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                retry(self.fs.pipe_file, path, data)
        except PermissionError as e:
            fix = (f"to add a teacher to a cache you may only read, write it to an overlay you own: "
                   f"`mtkd-cache run OVERLAY_URL --inputs {self.url} ...`" if key.startswith("teachers/")
                   else "choose a writable destination or fix its permissions")
            raise CacheWriteError(f"cannot write {key!r} under {self.url}: permission denied; {fix}") from e
        except OSError as e:
            raise CacheWriteError(f"cannot write {key!r} under {self.url}: {e}") from e

    def read_json(self, key: str) -> dict[str, Any]:
        raw = self.read_bytes(key)
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheFormatError(
                f"{self.url}: {key} is not valid JSON ({e}); the file is corrupt — restore it or "
                f"re-create the cache"
            ) from e
        if not isinstance(value, dict):
            raise CacheFormatError(f"{self.url}: {key} holds {type(value).__name__}, expected an object")
        return value

    def write_json(self, key: str, value: Mapping[str, Any]) -> None:
        self.write_bytes(key, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def remove(self, key: str) -> None:
        if self.exists(key):
            retry(self.fs.rm, self.path(key), recursive=True)

    def listdir(self, key: str) -> list[str]:
        if not self.exists(key):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in retry(self.fs.ls, self.path(key), detail=False))

    def subdirs(self, key: str) -> list[str]:
        """Names of the folders directly under `key` (zarr's own `zarr.json` files are not folders)."""
        if not self.exists(key):
            return []
        entries = retry(self.fs.ls, self.path(key), detail=True)
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def size_of(self, key: str) -> int:
        """Total stored bytes under `key` (recursive)."""
        if not self.exists(key):
            return 0
        return int(sum(retry(self.fs.du, self.path(key), total=False).values()))

    def check_writable(self) -> None:
        """Fail early, before any work, if the destination cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"")
        self.remove(probe)

    # -- tables ----------------------------------------------------------------------------------
    def write_table(self, key: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(key, sink.getvalue())

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, CacheNotFoundError):
                raise
            fix = ("re-create the inputs with `mtkd-cache prepare ... --overwrite`" if key.startswith("inputs/")
                   else "re-run the teacher with `mtkd-cache run ... --overwrite`")
            raise CacheCorruptError(f"{self.url}: {key} is not a readable Parquet file ({e}); it is damaged: "
                                    f"restore it from a copy or {fix}") from e

    # -- zarr ------------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False, strict: bool = True, tag: str = "") -> Any:
        """The zarr store of the root; read-only stores never write and (`strict`) raise on absent chunks.

        Remote stores retry transient errors; read-only ones with a content `tag` (a teacher hash,
        a dataset fingerprint) keep downloaded shards in the local chunk cache (format/remote.py).
        """
        if self.is_local:
            if not read_only:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            store: Any = zarr.storage.LocalStore(self.root, read_only=read_only)
        else:
            store = zarr.storage.FsspecStore.from_url(
                self.url, storage_options=self.storage_options or None, read_only=read_only)
            store = RemoteZarrStore(store, self._chunk_cache(tag) if read_only else None, self._namespace(tag))
        return StrictStore(store) if read_only and strict else store

    def teachers_with(self, marker: str) -> list[str]:
        """Names of the folders `teachers/<name>/` that hold `marker`.

        One listing call where the store can list by prefix. Over HTTP a glob is several requests
        (one per folder level) retried as a whole, so a server that fails every few requests would
        fail every attempt: there each request is retried on its own.
        """
        if not {"http", "https"} & set(self.protocols):
            found = retry(self.fs.glob, self.path(f"teachers/*/{marker}"))
            return sorted(str(p).rstrip("/").rsplit("/", 2)[-2] for p in found)
        try:
            folders = retry(self.fs.ls, self.path("teachers"), detail=False)
        except FileNotFoundError:
            return []
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in folders]
        return sorted(n for n in names if self.exists(f"teachers/{n}/{marker}"))

    def open_group(self, key: str, mode: str = "r", strict: bool = True, tag: str = "") -> zarr.Group:
        store = self.zarr_store(read_only=(mode == "r"), strict=strict, tag=tag)
        try:
            # mtkd writes zarr v3 only; naming it spares probes for v2 keys (.zgroup, .zattrs) that
            # cost a request each on object stores (and a listing when absent)
            return zarr.open_group(store, path=key, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        except FileNotFoundError as e:
            raise CacheNotFoundError(f"{self.url}: zarr group {key!r} does not exist") from e
