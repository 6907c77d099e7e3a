"""Other tokenizations of a cache's stored text: one per tokenizer, shared by the teachers using it.

`tokenizations/<id>/` (id = the first 16 hex digits of the tokenizer fingerprint) holds:

* `tokenization.json` (written last: its presence means complete): the tokenizer, the text
  fingerprint it was derived from, its chunk grid (the inputs' samples per chunk, its own
  positions per sample), its fingerprint and the share of the text's bytes it loses;
* `token_ids` and `byte_ends` (int32, on its token grid) and `samples.parquet` (`sample_id`,
  `offset`, `num_positions`), laid out like the inputs'; `chunks.parquet` (`chunk`, `array`,
  `checksum`: each chunk's content checksum, in the order the fingerprint hashes them);
* `tokenizer/` (its files) and `vocab_map` (int32, one student id per token id, -1 = none:
  `align.build_vocab_map` toward the inputs' tokenizer, fingerprinted by both tokenizers).

`TokenizationReader` presents a tokenization as the inputs of a cache, so a teacher run and its
`TeacherWriter` work on its grid unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from mtkd_cache._version import __version__
from mtkd_cache.errors import CacheCorruptError, CacheIncompleteError, CacheMismatchError
from mtkd_cache.format.checks import read_rows
from mtkd_cache.format.layout import ChunkGrid, chunk_rows
from mtkd_cache.format.meta import InputsMeta, TokenizerInfo
from mtkd_cache.format.store import now_iso

__all__ = ["TokenizationMeta", "TokenizationReader", "tokenization_id", "tokenization_key"]


PARTIAL = ".partial-"
"""Prefix of a tokenization being built (`tokenizations/.partial-<id>-<random>`), committed by a rename."""

CHUNKS_SCHEMA = pa.schema([("chunk", pa.int64()), ("array", pa.string()), ("checksum", pa.string())])
"""`tokenizations/<id>/chunks.parquet`: the content checksum of each chunk of each array."""


def tokenization_id(tokenizer_fingerprint: str) -> str:
    return tokenizer_fingerprint[:16]


def tokenization_key(tid: str) -> str:
    return f"tokenizations/{tid}"


def _fix(url: str, tid: str) -> str:
    return (f"delete {url}/{tokenization_key(tid)} and the teachers that use it, then re-run `mtkd-cache run` "
            f"(it re-tokenizes the stored text)")


@dataclass(frozen=True)
class TokenizationMeta:
    """`tokenizations/<id>/tokenization.json`."""

    id: str
    tokenizer: TokenizerInfo
    text_fingerprint: str
    dataset_fingerprint: str
    grid: ChunkGrid
    num_positions: int
    fingerprint: str
    lost: float
    vocab_map: dict[str, Any]
    alignment_rate: float = 0.0
    """Share of the inputs' positions (student rows) that have a row of this tokenization."""
    mtkd_version: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"], d["tokenizer"] = self.grid.to_dict(), self.tokenizer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizationMeta:
        try:
            return cls(**{**d, "grid": ChunkGrid.from_dict(d["grid"]), "tokenizer": TokenizerInfo.from_dict(d["tokenizer"])})
        except (KeyError, TypeError) as e:
            raise CacheCorruptError(f"tokenization.json of {d.get('id', '?')!r} is malformed ({e})") from None

    def as_inputs(self, inputs: InputsMeta) -> InputsMeta:
        """The cache's inputs seen through this tokenization (its grid, tokenizer and length)."""
        return dataclasses.replace(inputs, grid=self.grid, tokenizer=self.tokenizer, num_positions=self.num_positions,
                                   max_length=self.grid.chunk_positions // self.grid.chunk_samples, arrays={},
                                   has_labels=False, domains=None, label_names=None)


def content_fingerprint(tokenizer_fp: str, text_fp: str, checksums: list[str]) -> str:
    h = hashlib.sha256(f"mtkd-tokenization-v1|{tokenizer_fp}|{text_fp}|".encode())
    for c in checksums:
        h.update(c.encode())
    return h.hexdigest()[:32]


class TokenizationReader:
    """A tokenization read like a cache's inputs (the parts `run` and the trainer use)."""

    def __init__(self, reader: Any, tid: str):
        key = tokenization_key(tid)
        store = reader.tokenization_store(tid)  # an overlay's own, or the cache's
        if not store.exists(f"{key}/tokenization.json"):
            raise CacheIncompleteError(f"tokenization {tid!r} is not in {reader.url} (or was never finished); "
                                       f"re-run `mtkd-cache run` for the teacher that uses it")
        self.meta = TokenizationMeta.from_dict(store.read_json(f"{key}/tokenization.json"))
        if reader.inputs.text is None or self.meta.text_fingerprint != reader.inputs.text["fingerprint"]:
            raise CacheMismatchError(f"tokenization {tid!r} in {reader.url} was made from other text than the "
                                     f"inputs'; {_fix(reader.url, tid)}")
        self.base, self.store, self.id, self.key, self.check = reader, store, tid, key, reader.check
        self.inputs = self.meta.as_inputs(reader.inputs)
        self._arrays: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return str(self.base.url)

    @property
    def num_chunks(self) -> int:
        return self.meta.grid.num_chunks

    @cached_property
    def sample_columns(self) -> dict[str, Any]:
        t = self.store.read_table(f"{self.key}/samples.parquet")
        out: dict[str, Any] = {c: t.column(c).to_numpy() for c in ("sample_id", "offset", "num_positions")}
        if len(out["sample_id"]) != self.inputs.num_samples:
            raise CacheCorruptError(f"{self.store.path(self.key)}/samples.parquet has {len(out['sample_id'])} rows, "
                                    f"the inputs {self.inputs.num_samples}; {_fix(self.url, self.id)}")
        return {**out, "label": None, "domain": None}

    @property
    def _columns(self) -> dict[str, Any]:
        return self.sample_columns

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name` (checked like every read)."""
        if name not in self._arrays:
            self._arrays[name] = self.store.open_group(self.key, mode="r", strict=self.check)[name]
        return read_rows(self.store, self._arrays[name], owner=f"tokenization {self.id!r}", group_key=self.key,
                         name=name, start=start, stop=stop, grid=self.meta.grid, on="token",
                         fix=_fix(self.url, self.id))

    def chunk_layout(self, chunk: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(offsets within the chunk, lengths, first row) of chunk `chunk`'s samples."""
        s0, s1 = self.meta.grid.sample_range(chunk)
        p0 = chunk_rows(self.meta.grid, chunk, "token")[0]
        cols = self.sample_columns
        return cols["offset"][s0:s1] - p0, cols["num_positions"][s0:s1].astype(np.int64), p0

    def read_chunk(self, chunk: int) -> Any:
        from mtkd_cache.format.reader import ChunkData

        offsets, lengths, p0 = self.chunk_layout(chunk)
        s0, s1 = self.meta.grid.sample_range(chunk)
        used = int(offsets[-1] + lengths[-1]) if len(offsets) else 0
        ids = self.rows("token_ids", p0, p0 + used).astype(np.int64)
        return ChunkData(chunk=chunk, sample_ids=self.sample_columns["sample_id"][s0:s1], offsets=offsets,
                         lengths=lengths, inputs={"token_ids": ids}, labels=None, domains=None)

    def vocab_map(self) -> np.ndarray:
        return np.asarray(self.rows_1d("vocab_map"), dtype=np.int64)

    def rows_1d(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self.store.open_group(self.key, mode="r", strict=self.check)[name]
        arr = self._arrays[name]
        got = read_rows(self.store, arr, owner=f"tokenization {self.id!r}", group_key=self.key, name=name, start=0,
                        stop=int(arr.shape[0]), grid=self.meta.grid, on="token", fix=_fix(self.url, self.id))
        if hashlib.sha256(got.astype("<i4").tobytes()).hexdigest() != self.meta.vocab_map.get("sha256"):
            raise CacheCorruptError(f"{self.store.path(self.key)}/{name} does not match its recorded sha256; "
                                    f"{_fix(self.url, self.id)}")
        return got


def sample_table(offsets: list[int], lengths: list[int]) -> pa.Table:
    n = len(offsets)
    return pa.table({"sample_id": pa.array(np.arange(n, dtype=np.int64)), "offset": pa.array(offsets, pa.int64()),
                     "num_positions": pa.array(lengths, pa.int32())})


def finished_meta(**fields: Any) -> TokenizationMeta:
    return TokenizationMeta(**fields, mtkd_version=__version__, created=now_iso())
