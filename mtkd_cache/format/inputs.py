"""Chunked writing of a cache's inputs (token ids or fixed-shape arrays) and sample table."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtkd_cache._version import FORMAT_VERSION, __version__
from mtkd_cache.errors import InputDataError
from mtkd_cache.format.codecs import Compressor, array_checksum, chunk_codecs
from mtkd_cache.format.fingerprint import (
    DatasetHasher,
    sample_content,
    sample_hash,
    token_sample_content,
)
from mtkd_cache.format.layout import chunk_rows, make_grid
from mtkd_cache.format.loss_mask import LOSS_MASK, create_loss_mask_array
from mtkd_cache.format.meta import InputsMeta, Manifest, TokenizerInfo
from mtkd_cache.format.store import CacheStore, now_iso
from mtkd_cache.format.text import TextWriter

__all__ = ["InputsWriter", "Sample", "SAMPLE_SCHEMA"]

SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("source_row", pa.int64()),
    ("num_positions", pa.int32()),
    ("offset", pa.int64()),
    ("content_hash", pa.string()),
    ("label", pa.int64()),
    ("domain", pa.string()),
    ("doc_starts", pa.list_(pa.int32())),
])


class Sample(NamedTuple):
    source_row: int
    arrays: tuple[np.ndarray, ...]
    label: Any
    domain: str | None
    doc_starts: list[int] | None
    loss_mask: np.ndarray | None = None
    """(L,) bool per token, for writers made with ``loss_mask=True`` (format/loss_mask.py)."""
    text: tuple[str, np.ndarray] | None = None
    """The characters the sample covers and its tokens' byte ends in them (format/text.py)."""


class InputsWriter:
    """Accumulates samples, writes a chunk of zarr rows + table rows each `chunk_samples` samples."""

    def __init__(self, store: CacheStore, *, kind: str, chunk_samples: int, positions_per_sample: int,
                 token_dtype: str = "int32", array_specs: dict[str, tuple[tuple[int, ...], Any]] | None = None,
                 loss_mask: bool = False, with_text: bool = False):
        self.store, self.kind = store, kind
        self.grid0 = make_grid(chunk_samples, chunk_samples, positions_per_sample)
        self.S, self.C = self.grid0.chunk_samples, self.grid0.chunk_positions
        self.L = positions_per_sample
        root = store.open_group("", mode="a")
        grp = root.require_group("inputs")
        codecs = chunk_codecs(Compressor())
        full: Any = {"write_empty_chunks": True}  # every shard and inner chunk is stored: absent = lost
        self.arrays: dict[str, Any] = {}
        if kind == "tokens":
            self.arrays["token_ids"] = grp.create_array(
                "token_ids", shape=(0,), dtype=token_dtype, chunks=(self.grid0.inner_positions,),
                shards=(self.C,), compressors=codecs, fill_value=0, overwrite=True, config=full)
            if loss_mask:
                self.arrays[LOSS_MASK] = create_loss_mask_array(grp, self.arrays["token_ids"], compressors=codecs,
                                                                config=full)
        else:
            ag = grp.require_group("arrays")
            for name, (shape, dtype) in (array_specs or {}).items():
                self.arrays[name] = ag.create_array(
                    name, shape=(0, *shape), dtype=np.dtype(dtype), chunks=(self.grid0.inner_samples, *shape),
                    shards=(self.S, *shape), compressors=codecs, fill_value=0, overwrite=True,
                    config=full)
        self.text = TextWriter(store, self.grid0) if with_text and kind == "tokens" else None
        self.buffer: list[Sample] = []
        self.n_chunks = 0
        self.n_samples = 0
        self.n_positions = 0
        self.hashes: list[str] = []
        self.label_names: dict[str, int] = {}
        self.domains: set[str] = set()
        self.has_labels = False
        self.checksums: list[dict[str, Any]] = []
        # The sample table streams into the cache itself (never a system temp folder), so a killed
        # prepare leaves nothing behind outside the cache; `finish` moves it into place.
        self._partial = "inputs/samples.parquet.partial"
        self._sink = store.fs.open(store.path(self._partial), "wb")
        self._table = pq.ParquetWriter(self._sink, SAMPLE_SCHEMA, compression="zstd")

    def add(self, sample: Sample) -> None:
        self.buffer.append(sample)
        if len(self.buffer) == self.S:
            self._flush()

    def _label(self, value: Any) -> int | None:
        if value is None:
            return None
        self.has_labels = True
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if isinstance(value, (int, np.integer)):
            return int(value)
        key = str(value)
        return self.label_names.setdefault(key, len(self.label_names))

    def _flush(self) -> None:
        if not self.buffer:
            return
        c = self.n_chunks
        self.n_chunks += 1
        rows: dict[str, list[Any]] = {f.name: [] for f in SAMPLE_SCHEMA}
        if self.kind == "tokens":
            self._flush_tokens(c, rows)
            self._flush_text(c, rows["offset"])
        else:
            for j, (name, arr) in enumerate(sorted(self.arrays.items())):
                block = np.zeros((self.S, *arr.shape[1:]), dtype=arr.dtype)
                block[: len(self.buffer)] = np.stack([s.arrays[j] for s in self.buffer])
                r0, r1 = chunk_rows(self.grid0, c, "sample")
                arr.resize((r1, *arr.shape[1:]))
                arr[r0:r1] = block
                self.checksums.append({"chunk": c, "array": f"arrays/{name}", "checksum": array_checksum(block)})
            for i, s in enumerate(self.buffer):
                rows["offset"].append(c * self.S + i)
                rows["num_positions"].append(1)
                rows["content_hash"].append(sample_hash(sample_content(s.arrays, self._label(s.label), s.domain)))
        for i, s in enumerate(self.buffer):
            rows["sample_id"].append(self.n_samples + i)
            rows["source_row"].append(s.source_row)
            rows["label"].append(self._label(s.label))
            if s.domain is not None:
                self.domains.add(str(s.domain))
            rows["domain"].append(None if s.domain is None else str(s.domain))
            rows["doc_starts"].append(s.doc_starts)
        self.hashes.extend(rows["content_hash"])
        self.n_samples += len(self.buffer)
        self.n_positions += int(sum(rows["num_positions"]))
        self._table.write_table(pa.table(rows, schema=SAMPLE_SCHEMA))
        self.buffer = []

    def _flush_tokens(self, c: int, rows: dict[str, list[Any]]) -> None:
        """Chunk `c` of token ids (and of the loss mask, when the writer has one) plus their table rows."""
        masked = LOSS_MASK in self.arrays
        blocks = {name: np.zeros(self.C, dtype=arr.dtype) for name, arr in self.arrays.items()}
        cursor = 0
        for s in self.buffer:
            ids = s.arrays[0]
            mask = None
            if masked:
                if s.loss_mask is None or len(s.loss_mask) != len(ids):
                    raise InputDataError(f"source row {s.source_row}: its loss mask does not match its "
                                         f"{len(ids)} tokens; give every sample a mask of its length")
                mask = np.asarray(s.loss_mask, dtype=np.uint8)
                blocks[LOSS_MASK][cursor : cursor + len(ids)] = mask
            blocks["token_ids"][cursor : cursor + len(ids)] = ids
            rows["offset"].append(c * self.C + cursor)
            rows["num_positions"].append(len(ids))
            rows["content_hash"].append(sample_hash(token_sample_content(ids, mask, self._label(s.label), s.domain)))
            cursor += len(ids)
        r0, r1 = chunk_rows(self.grid0, c, "token")
        for name, arr in self.arrays.items():
            arr.resize((r1,))
            arr[r0:r1] = blocks[name]
            self.checksums.append({"chunk": c, "array": name, "checksum": array_checksum(blocks[name])})

    def _flush_text(self, chunk: int, offsets: list[int]) -> None:
        if self.text is None:
            return
        if any(s.text is None for s in self.buffer):
            raise ValueError("every sample of inputs written with_text needs its text")
        texts = [s.text[0] for s in self.buffer]  # type: ignore[index]
        ends = [s.text[1] for s in self.buffer]  # type: ignore[index]
        self.checksums.append(self.text.flush(chunk, self.n_samples, texts, ends,
                                              [o - chunk * self.C for o in offsets]))

    def __enter__(self) -> InputsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None:
            self.discard()

    def discard(self) -> None:
        """After a failure (a full disk): close the open Parquet writers, keeping the first error.

        Committed chunks stay for the rerun. Without this, garbage collection closes the writers
        later, fails again on the full disk and prints a traceback after the one-line error.
        """
        for owner in (self, self.text):
            for name in ("_table", "_sink"):
                handle = getattr(owner, name, None) if owner is not None else None
                if handle is None:
                    continue
                with contextlib.suppress(OSError):
                    handle.close()
                if hasattr(handle, "is_open"):
                    handle.is_open = False  # pyarrow retries close() in __del__ otherwise

    def finish(self, hasher: DatasetHasher, *, max_length: int, tokenizer: TokenizerInfo | None,
               settings: dict[str, Any], source: str, packed: bool) -> InputsMeta:
        self._flush()
        self._table.close()
        self._sink.close()
        if self.n_samples == 0:
            self.store.remove(self._partial)
            if self.text is not None:
                self.text.abort()
            raise InputDataError(f"--data {source!r} gave no usable samples (every row was empty?)")
        self.store.write_bytes("inputs/samples.parquet", self.store.read_bytes(self._partial))
        self.store.remove(self._partial)
        self.store.write_table("inputs/chunks.parquet", pa.Table.from_pylist(self.checksums))
        hasher.update(self.hashes)
        grid = make_grid(self.n_samples, self.S, self.L)
        text = None if self.text is None else self.text.finish()
        meta = InputsMeta(
            kind=self.kind,  # type: ignore[arg-type]
            dataset_fingerprint=hasher.hexdigest(),
            num_samples=self.n_samples,
            num_positions=self.n_positions,
            max_length=max_length,
            grid=grid,
            tokenizer=tokenizer,
            arrays={k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in self.arrays.items()},
            label_names=[k for k, _ in sorted(self.label_names.items(), key=lambda kv: kv[1])] or None,
            domains=sorted(self.domains) or None,
            has_labels=self.has_labels,
            packed=packed,
            source={"data": source, "settings": settings, "fingerprint_settings": hasher.settings},
            mtkd_version=__version__,
            created=now_iso(),
            text=text,
        )
        self.store.write_json("inputs/inputs.json", meta.to_dict())
        manifest = Manifest(format_version=FORMAT_VERSION, mtkd_version=__version__,
                            dataset_fingerprint=meta.dataset_fingerprint, updated=now_iso())
        self.store.write_json("manifest.json", manifest.to_dict())
        return meta


