"""Whole-shard reads: one storage GET per shard, decoded with numcodecs, every byte checked.

zarr's read path (an async pipeline, per-inner-chunk futures and buffer prototypes) costs more
CPU than the decompression itself on the loader's reads. Every mtkd array has one fixed layout
(`chunk_codecs`): a zarr v3 `sharding_indexed` shard whose inner chunks are `bytes` -> zstd or
blosc -> crc32c, with the index (uint64 offset, nbytes per inner chunk) at the end, followed by
its own crc32c. For a read that covers at least half a shard, `ShardedArray` fetches the shard
object whole and decodes it here:

1. the index's crc32c is verified, then each touched inner chunk's crc32c over its compressed
   bytes (google-crc32c, several GB/s: the check costs a few percent of the decode);
2. the compressed bytes are decompressed straight into the output array (numcodecs `out=`).

An absent shard raises `MissingChunkError` and a checksum mismatch a `ValueError` naming the
checksum, exactly the failures zarr's own path raises, so `checks.read_rows` turns both into the
same one-line `CacheCorruptError`. Arrays of any other layout, and short reads (a random-access
sample: zarr reads only the inner chunk it needs), go through zarr unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from mtkd_cache.errors import CacheNotFoundError
from mtkd_cache.format.store import CacheStore, MissingChunkError

__all__ = ["ShardLayout", "ShardedArray", "decode_shard", "shard_layout"]

_EMPTY = np.uint64(2**64 - 1)  # an inner chunk zarr did not store (all fill value)
_CRC = 4


@dataclass(frozen=True)
class ShardLayout:
    """What a shard of an mtkd array looks like: rows per shard and inner chunk, row shape, dtype."""

    shard_rows: int
    inner_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: Any
    decompressor: Any

    @property
    def inner_per_shard(self) -> int:
        return self.shard_rows // self.inner_rows


def _is_little(codec: Any) -> bool:
    endian = getattr(codec, "endian", None)
    return endian is None or getattr(endian, "value", endian) == "little"


def shard_layout(arr: Any) -> ShardLayout | None:
    """The layout of zarr array `arr` when it is the one mtkd writes, else None (read through zarr)."""
    codecs = tuple(arr.metadata.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    inner, index = tuple(sc.codecs), tuple(sc.index_codecs)
    if (getattr(sc.index_location, "value", sc.index_location) != "end" or len(index) != 2
            or not isinstance(index[0], BytesCodec) or not _is_little(index[0])
            or not isinstance(index[1], Crc32cCodec) or len(inner) != 3 or not isinstance(inner[0], BytesCodec)
            or not _is_little(inner[0]) or not isinstance(inner[2], Crc32cCodec)):
        return None
    if isinstance(inner[1], ZstdCodec):
        decompressor: Any = Zstd()
    elif isinstance(inner[1], BloscCodec):
        decompressor = Blosc()  # blosc frames carry their own settings
    else:
        return None
    dtype = np.dtype(arr.dtype)
    shape, shards, chunks = tuple(arr.shape), tuple(arr.shards or ()), tuple(sc.chunk_shape)
    if (not shape or dtype.byteorder == ">" or dtype.kind not in "biuf" or len(shards) != len(shape)
            or shards[1:] != shape[1:] or chunks[1:] != shape[1:] or shards[0] % chunks[0]):
        return None
    return ShardLayout(shard_rows=shards[0], inner_rows=chunks[0], row_shape=shape[1:], dtype=dtype,
                       fill_value=arr.fill_value, decompressor=decompressor)


def _crc_ok(data: np.ndarray) -> bool:
    """True when the last 4 bytes of `data` (uint8) are the crc32c of the bytes before them."""
    return int(google_crc32c.value(data[:-_CRC])) == int(data[-_CRC:].view("<u4")[0])


def decode_shard(raw: bytes, layout: ShardLayout, first: int, last: int) -> np.ndarray:
    """Inner chunks [first, last) of one shard's bytes, checksums verified, as (rows, *row_shape).

    Raises:
        ValueError: a checksum mismatch (index or inner chunk) or a malformed shard.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    n = layout.inner_per_shard
    index_bytes = 16 * n + _CRC
    if buf.size < index_bytes:
        raise ValueError(f"shard of {buf.size} bytes is shorter than its index ({index_bytes} bytes)")
    index = buf[buf.size - index_bytes:]
    if not _crc_ok(index):
        raise ValueError("shard index checksum mismatch")
    table = index[:-_CRC].view("<u8").reshape(n, 2)
    out = np.empty(((last - first) * layout.inner_rows, *layout.row_shape), dtype=layout.dtype)
    span = out.reshape(last - first, -1)
    for j, (offset, nbytes) in enumerate(table[first:last]):
        if offset == _EMPTY and nbytes == _EMPTY:
            span[j] = layout.fill_value
            continue
        if nbytes < _CRC or offset + nbytes > buf.size - index_bytes:
            raise ValueError(f"inner chunk {first + j} lies outside its shard (offset {offset}, {nbytes} bytes)")
        chunk = buf[int(offset):int(offset + nbytes)]
        if not _crc_ok(chunk):
            raise ValueError(f"inner chunk {first + j} checksum mismatch")
        got = layout.decompressor.decode(chunk[:-_CRC], out=span[j].view(np.uint8))
        if np.asarray(got).nbytes != span[j].nbytes:
            raise ValueError(f"inner chunk {first + j} decompressed to the wrong size")
    return out


class ShardedArray:
    """A zarr array read whole-shard-at-a-time where it pays (see the module docstring).

    Indexing takes a row slice `[start:stop]` (the only form mtkd's readers use) and returns an
    ndarray; anything the fast path does not cover is delegated to the zarr array.

    Args:
        store: The cache.
        key: The array's key in the cache (e.g. "teachers/lm/indices").
        arr: The opened zarr array.
        strict: An absent shard raises `MissingChunkError` (off only with the reader's
            `check=False`, where it reads as the fill value, as zarr does).
        tag: The content tag the array's group was opened with: remote shards then go through the
            local chunk cache (`CacheStore.read_shard`).
    """

    def __init__(self, store: CacheStore, key: str, arr: Any, *, strict: bool = True, tag: str = ""):
        self.store, self.key, self.array, self.strict, self.tag = store, key, arr, strict, tag
        self.layout = shard_layout(arr)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        lay = self.layout
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (0, 0, 0)
        if lay is None or step != 1 or stop <= start or 2 * (stop - start) < lay.shard_rows:
            return np.asarray(self.array[rows])
        shard = start // lay.shard_rows
        if (stop - 1) // lay.shard_rows != shard:
            return np.asarray(self.array[rows])
        base = shard * lay.shard_rows
        first, last = (start - base) // lay.inner_rows, -(-(stop - base) // lay.inner_rows)
        skey = f"{self.key}/c/{shard}" + "/0" * (len(self.shape) - 1)
        try:
            raw = self.store.read_shard(skey, self.tag)
        except CacheNotFoundError as e:
            if not self.strict:
                return np.full((stop - start, *lay.row_shape), lay.fill_value, dtype=lay.dtype)
            raise MissingChunkError(skey) from e
        block = decode_shard(raw, lay, first, last)
        lo = start - base - first * lay.inner_rows
        return block[lo:lo + stop - start]
