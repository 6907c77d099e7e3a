"""`export` a cache to Parquet that Hugging Face `datasets` loads, and `import` it back, bit for bit.

Layout of OUT:
- `data/train-NNNNN.parquet`: one row per sample: the sample table's columns (sample_id, label,
  domain, ...) and one list column per stored array, named by its path in the cache
  (`inputs/token_ids`, `teachers/<t>/indices`, `teachers/<t>/values`, ...). A token-grid array
  holds the sample's positions row after row, flattened (trailing shape in the card); a
  sample-grid array (classification teachers, pooled features) holds the sample's one row. Values
  are the stored codes (see docs/FORMAT.md: u8log values, float16 tails), so nothing is lost.
  A file is closed at ~`max_file_bytes` (500 MB) of data; one row group per cache chunk.
- `mtkd/files.parquet`: every small file of the cache (manifest, inputs.json, sample table,
  teacher.json, chunks.parquet, commit markers, zarr.json) as (key, bytes): one file, not one
  per chunk, so Hub repositories stay far below 100k files.
- `README.md`: a dataset card with YAML metadata (teachers, k/draws, encoding, fingerprints, stats,
  format version, license) and how to load it.

`import` writes the small files back, creates every array from its own zarr.json and fills it
chunk by chunk from the rows, so `verify` passes and arrays equal the original's. Cost: one read
of every array (export) or one write (import); memory: one cache chunk.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from mtkd_cache.errors import CacheExistsError, CacheFormatError
from mtkd_cache.format.layout import ChunkGrid, chunk_rows
from mtkd_cache.format.meta import InputsMeta
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.ops.card import dataset_card

__all__ = ["ExportReport", "export_cache", "import_cache"]

FILES = "mtkd/files.parquet"
MAX_FILE_BYTES = 500 * 2**20


@dataclass
class ExportReport:
    """Files written and rows exported (or imported)."""

    files: int
    rows: int
    bytes: int


def _arrays(group: zarr.Group) -> dict[str, Any]:
    """Every zarr array under `group` by its path (`inputs/token_ids`, `teachers/t/indices`, ...)."""
    with warnings.catch_warnings():  # mtkd's own files (json, parquet) sit next to the zarr nodes
        warnings.simplefilter("ignore")
        return {path: arr for path, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}


def _small_files(store: CacheStore) -> Iterator[str]:
    for p in sorted(store.fs.find(store.root)):
        key = str(p)[len(store.root):].lstrip("/")
        if "/c/" not in f"/{key}" and not key.endswith(".lock") and not key.startswith(".write-probe"):
            yield key


def _grid_of(grid: ChunkGrid, arr: Any) -> str:
    return "token" if arr.shape[0] == grid.shape_of("token")[0] else "sample"


def _chunk_table(reader: CacheReader, arrays: Mapping[str, Any], chunk: int, samples: pa.Table) -> pa.Table:
    data = reader.read_chunk(chunk)  # checked: ids, offsets, lengths of the chunk's real samples
    n = len(data.sample_ids)
    cols: dict[str, pa.Array] = {c: samples.column(c).slice(int(data.sample_ids[0]), n).combine_chunks()
                                 for c in samples.column_names}
    for path, arr in arrays.items():
        on = _grid_of(reader.grid, arr)
        r0 = chunk_rows(reader.grid, chunk, on)[0]
        if on == "token":
            raw = arr[r0:r0 + int(data.offsets[-1] + data.lengths[-1])]
            spans = [(int(o), int(o + ln)) for o, ln in zip(data.offsets, data.lengths, strict=True)]
        else:
            raw, spans = arr[r0:r0 + n], [(i, i + 1) for i in range(n)]
        cols[path] = pa.array([raw[a:b].reshape(-1) for a, b in spans], type=pa.list_(pa.from_numpy_dtype(raw.dtype)))
    return pa.table(cols)


def export_cache(cache: str | os.PathLike[str], out: str | os.PathLike[str], *, license: str = "unknown",
                 storage_options: Mapping[str, Any] | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES) -> ExportReport:
    """Write cache `cache` to `out` as Parquet shards, the cache's small files and a dataset card.

    Raises:
        CacheExistsError: `out` already holds an export.
    """
    reader = CacheReader(CacheStore(cache, storage_options))
    dst = CacheStore(out, storage_options)
    if dst.exists(FILES):
        raise CacheExistsError(f"{out} already holds an export ({FILES}); choose an empty folder")
    arrays = _arrays(reader.store.open_group("", mode="r"))
    samples = reader.samples
    files, rows, size, writer, sink = 0, 0, 0, None, io.BytesIO()

    def close() -> None:
        nonlocal writer, files, size, sink
        if writer is not None:
            writer.close()
            dst.write_bytes(f"data/train-{files:05d}.parquet", sink.getvalue())
            files, size, writer, sink = files + 1, size + len(sink.getvalue()), None, io.BytesIO()

    for chunk in range(reader.num_chunks):
        table = _chunk_table(reader, arrays, chunk, samples)
        if writer is None:
            writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
        writer.write_table(table)
        rows += table.num_rows
        if sink.tell() >= max_file_bytes:
            close()
    close()
    small = [(k, reader.store.read_bytes(k)) for k in _small_files(reader.store)]
    dst.write_table(FILES, pa.table({"key": [k for k, _ in small], "data": [b for _, b in small]}))
    shapes = {p: list(a.shape[1:]) for p, a in arrays.items()}
    dst.write_bytes("README.md", dataset_card(reader, shapes, license, files, rows).encode())
    return ExportReport(files=files + 2, rows=rows, bytes=size)


def import_cache(export: str | os.PathLike[str], cache: str | os.PathLike[str], *,
                 storage_options: Mapping[str, Any] | None = None) -> ExportReport:
    """Rebuild a cache from an export made by `export_cache`.

    Raises:
        CacheExistsError: `cache` already holds a cache. CacheFormatError: `export` is not an export.
    """
    src, dst = CacheStore(export, storage_options), CacheStore(cache, storage_options)
    if not src.exists(FILES):
        raise CacheFormatError(f"{export} is not an mtkd export ({FILES} is missing); export it with `mtkd-cache export`")
    if dst.exists("manifest.json"):
        raise CacheExistsError(f"{cache} already holds a cache; import into an empty folder")
    small = src.read_table(FILES).to_pydict()
    pending = dict(zip(small["key"], small["data"], strict=True))
    for key in sorted(pending, key=lambda k: (k == "manifest.json", k.endswith("teacher.json"))):
        if key == "manifest.json" or key.endswith("teacher.json"):
            continue  # written last: the cache and its teachers are complete only when all is there
        dst.write_bytes(key, pending[key])
    arrays = _arrays(dst.open_group("", mode="a"))
    grid = InputsMeta.from_dict(dst.read_json("inputs/inputs.json")).grid
    rows, n = 0, 0
    for name in sorted(k for k in src.listdir("data") if k.endswith(".parquet")):
        for batch in pq.ParquetFile(io.BytesIO(src.read_bytes(f"data/{name}"))).iter_batches(batch_size=1 << 30):
            rows += _fill(grid, arrays, pa.Table.from_batches([batch]))
            n += 1
    for key in sorted(k for k in pending if k.endswith("teacher.json")) + ["manifest.json"]:
        dst.write_bytes(key, pending[key])
    return ExportReport(files=n, rows=rows, bytes=0)


def _fill(grid: ChunkGrid, arrays: Mapping[str, Any], table: pa.Table) -> int:
    """Write `table`'s rows (whole cache chunks, as exported) into the arrays."""
    ids = table.column("sample_id").to_numpy()
    chunks = np.array([grid.chunk_of_sample(int(i)) for i in ids])
    for chunk in np.unique(chunks):
        part = table.filter(pa.array(chunks == chunk))
        for path, arr in arrays.items():
            on = _grid_of(grid, arr)
            r0, r1 = chunk_rows(grid, chunk, on)
            block = np.full((r1 - r0, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
            values = part.column(path).combine_chunks()
            flat = values.values.to_numpy(zero_copy_only=False).astype(arr.dtype).reshape(-1, *arr.shape[1:])
            block[:len(flat)] = flat
            arr[r0:min(r1, arr.shape[0])] = block[:min(r1, arr.shape[0]) - r0]
    return table.num_rows
