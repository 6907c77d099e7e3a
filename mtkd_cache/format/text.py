"""The stored source text of token inputs (format 3) and the byte offsets of a tokenization.

Each sample keeps the exact characters its tokens cover (`inputs/text.parquet`: `sample_id`,
`text`), and every token row keeps where the token ends in that text's UTF-8 bytes
(`inputs/byte_ends`, int32, on the token grid next to `token_ids`). Any other tokenization of
the cache is derived from the text (format/tokenization.py); the byte ends align its rows with
the student's. The text is fingerprinted on its own (`inputs.json` `text.fingerprint`), so the
dataset fingerprint of token ids, and every teacher cached against it, is unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtkd_cache.errors import CacheCorruptError, CacheMismatchError
from mtkd_cache.format.checks import inputs_fix
from mtkd_cache.format.codecs import Compressor, array_checksum, chunk_codecs
from mtkd_cache.format.layout import ChunkGrid, chunk_rows
from mtkd_cache.format.store import CacheStore

__all__ = ["TEXT_KEY", "TextHasher", "TextWriter", "create_token_array", "read_byte_ends", "read_texts"]

TEXT_KEY = "inputs/text.parquet"
TEXT_SCHEMA = pa.schema([("sample_id", pa.int64()), ("text", pa.large_string())])


def create_token_array(group: Any, name: str, grid: ChunkGrid, dtype: str) -> Any:
    """An empty 1-D array on the token grid of `grid`: one shard per chunk, every shard stored."""
    return group.create_array(name, shape=(0,), dtype=dtype, chunks=(grid.inner_positions,),
                              shards=(grid.chunk_positions,), compressors=chunk_codecs(Compressor()),
                              fill_value=0, overwrite=True, config={"write_empty_chunks": True})


class TextHasher:
    """sha256 over each sample's text and byte ends, in sample order (the text fingerprint)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"mtkd-text-v1")
        self.num_bytes = 0

    def update(self, text: str, ends: np.ndarray) -> None:
        data = text.encode()
        self.num_bytes += len(data)
        self._h.update(len(data).to_bytes(8, "little") + data)
        e = np.ascontiguousarray(ends, dtype="<i4")
        self._h.update(len(e).to_bytes(8, "little") + e.tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class TextWriter:
    """Writes the text table and the `byte_ends` array next to an `InputsWriter` of token inputs."""

    def __init__(self, store: CacheStore, grid: ChunkGrid):
        self.store, self.grid = store, grid
        self.array = create_token_array(store.open_group("inputs", mode="a"), "byte_ends", grid, "int32")
        self.hasher = TextHasher()
        self._partial = f"{TEXT_KEY}.partial"
        self._sink = store.fs.open(store.path(self._partial), "wb")
        self._table = pq.ParquetWriter(self._sink, TEXT_SCHEMA, compression="zstd")

    def flush(self, chunk: int, first_id: int, texts: Sequence[str], ends: Sequence[np.ndarray],
              offsets: Sequence[int]) -> dict[str, Any]:
        """Write one chunk; `offsets` are the samples' first rows in the chunk. Returns its checksum row."""
        block = np.zeros(self.grid.chunk_positions, dtype=np.int32)
        for text, e, off in zip(texts, ends, offsets):
            block[off : off + len(e)] = e
            self.hasher.update(text, e)
        r0, r1 = chunk_rows(self.grid, chunk, "token")
        self.array.resize((r1,))
        self.array[r0:r1] = block
        ids = np.arange(first_id, first_id + len(texts), dtype=np.int64)
        self._table.write_table(pa.table({"sample_id": ids, "text": pa.array(texts, pa.large_string())},
                                         schema=TEXT_SCHEMA), row_group_size=max(1, len(texts)))
        return {"chunk": chunk, "array": "byte_ends", "checksum": array_checksum(block)}

    def finish(self) -> dict[str, Any]:
        """Move the table into place; the `text` entry of inputs.json."""
        self._table.close()
        self._sink.close()
        self.store.write_bytes(TEXT_KEY, self.store.read_bytes(self._partial))
        self.store.remove(self._partial)
        return {"fingerprint": self.hasher.hexdigest(), "num_bytes": self.hasher.num_bytes, "key": TEXT_KEY}

    def abort(self) -> None:
        self._table.close()
        self._sink.close()
        self.store.remove(self._partial)


def _require_text(reader: Any) -> None:
    if reader.inputs.text is None:
        raise CacheMismatchError(
            f"{reader.url} stores no source text (prepared by an older mtkd, from array inputs or with --pack), "
            f"so a teacher with another tokenizer cannot run on it; re-run `mtkd-cache prepare` without --pack")


def read_texts(reader: Any, chunk: int) -> list[str]:
    """The stored texts of chunk `chunk`'s samples (one Parquet row group per chunk), checked by id."""
    _require_text(reader)
    s0, s1 = reader.inputs.grid.sample_range(chunk)
    try:
        with reader.store.fs.open(reader.store.path(TEXT_KEY), "rb") as f:
            table = pq.ParquetFile(f).read_row_group(chunk)
    except (pa.ArrowException, OSError) as e:
        raise CacheCorruptError(f"{reader.store.path(TEXT_KEY)} chunk {chunk} is unreadable ({type(e).__name__}); "
                                f"{inputs_fix(reader.url)}") from e
    if not np.array_equal(table.column("sample_id").to_numpy(), np.arange(s0, s1)):
        raise CacheCorruptError(f"{reader.store.path(TEXT_KEY)} row group {chunk} does not hold samples "
                                f"{s0}..{s1 - 1}; {inputs_fix(reader.url)}")
    return [str(t) for t in table.column("text").to_pylist()]


def read_byte_ends(reader: Any, chunk: int, used: int) -> np.ndarray:
    """The primary tokenization's byte ends of chunk `chunk`'s first `used` rows (checked read)."""
    _require_text(reader)
    p0 = chunk_rows(reader.inputs.grid, chunk, "token")[0]
    return np.asarray(reader._input_rows("byte_ends", p0, p0 + used, "token"), dtype=np.int64)
