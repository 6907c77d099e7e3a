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
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
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
from mtkd_cache.ops._export_layout import WHOLE, Layout, layout_finder
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


def _chunk_table(reader: CacheReader, arrays: Mapping[str, tuple[Any, Layout]], chunk: int,
                 samples: pa.Table) -> pa.Table:
    data = reader.read_chunk(chunk)  # checked: ids, offsets, lengths of the chunk's real samples
    n = len(data.sample_ids)
    cols: dict[str, pa.Array] = {c: samples.column(c).slice(int(data.sample_ids[0]), n).combine_chunks()
                                 for c in samples.column_names}
    for path, (arr, layout) in arrays.items():
        r0, spans = layout.spans(arr, chunk)
        raw = arr[r0:r0 + spans[-1][1]]
        cols[path] = pa.array([raw[a:b].reshape(-1) for a, b in spans], type=pa.list_(pa.from_numpy_dtype(raw.dtype)))
    return pa.table(cols)


def _split(arrays: Mapping[str, Any], find: Callable[[str], Layout | None]) -> tuple[dict, dict]:
    """(arrays exported per sample, with their layout; arrays exported whole)."""
    layouts = {p: find(p) for p in arrays}
    return ({p: (a, layouts[p]) for p, a in arrays.items() if layouts[p] is not None},
            {p: a for p, a in arrays.items() if layouts[p] is None})


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
    find = layout_finder(reader.store.read_json, reader.store.read_table, reader.grid)
    arrays, whole = _split(_arrays(reader.store.open_group("", mode="r")), find)
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
    small += [(f"{WHOLE}/{p}.npy", _npy(a[...])) for p, a in whole.items()]
    dst.write_table(FILES, pa.table({"key": [k for k, _ in small], "data": [b for _, b in small]}))
    shapes = {p: list(a.shape[1:]) for p, (a, _) in arrays.items()}
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
        if key == "manifest.json" or key.endswith("teacher.json") or key.startswith(f"{WHOLE}/"):
            continue  # written last: the cache and its teachers are complete only when all is there
        dst.write_bytes(key, pending[key])
    grid = InputsMeta.from_dict(dst.read_json("inputs/inputs.json")).grid
    find = layout_finder(lambda k: json.loads(pending[k]), lambda k: pq.read_table(io.BytesIO(pending[k])), grid)
    arrays, whole = _split(_arrays(dst.open_group("", mode="a")), find)
    for path, arr in whole.items():
        arr[...] = np.load(io.BytesIO(pending[f"{WHOLE}/{path}.npy"]), allow_pickle=False)
    rows, n = 0, 0
    for name in sorted(k for k in src.listdir("data") if k.endswith(".parquet")):
        for batch in pq.ParquetFile(io.BytesIO(src.read_bytes(f"data/{name}"))).iter_batches(batch_size=1 << 30):
            rows += _fill(grid, arrays, pa.Table.from_batches([batch]))
            n += 1
    for key in sorted(k for k in pending if k.endswith("teacher.json")) + ["manifest.json"]:
        dst.write_bytes(key, pending[key])
    return ExportReport(files=n, rows=rows, bytes=0)


def _npy(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    return sink.getvalue()


def _fill(grid: ChunkGrid, arrays: Mapping[str, tuple[Any, Layout]], table: pa.Table) -> int:
    """Write `table`'s rows (whole cache chunks, as exported) into the arrays."""
    ids = table.column("sample_id").to_numpy()
    chunks = np.array([grid.chunk_of_sample(int(i)) for i in ids])
    for chunk in np.unique(chunks):
        part = table.filter(pa.array(chunks == chunk))
        for path, (arr, layout) in arrays.items():
            r0, r1 = chunk_rows(layout.grid, chunk, layout.on(arr))
            block = np.full((r1 - r0, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
            values = part.column(path).combine_chunks()
            flat = values.values.to_numpy(zero_copy_only=False).astype(arr.dtype).reshape(-1, *arr.shape[1:])
            block[:len(flat)] = flat
            arr[r0:min(r1, arr.shape[0])] = block[:min(r1, arr.shape[0]) - r0]
    return table.num_rows
