"""Reading a cache: `open_cache(url)` returns a `CacheReader`.

The manifest is read first and its format version checked. A teacher is complete exactly when
its `teachers/<name>/teacher.json` exists; only complete teachers are read. Reads go chunk by
chunk (sequential) or by sample id (random access); each decodes only the zarr inner chunks it
touches (whole-shard reads decode with numcodecs, format/shards.py), and every read is checked
(format/checks.py): a missing or damaged chunk, an id out of
range or an edited teacher.json is a `CacheCorruptError`, never silently wrong data. A reader
opens its zarr stores read-only and never writes to the cache.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from mtkd_cache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
)
from mtkd_cache.format.checks import (
    check_teacher_json,
    corrupt_error,
    inputs_fix,
    metadata_error,
    read_rows,
    teacher_fix,
    teacher_metadata_fix,
)
from mtkd_cache.format.kinds import (
    FEATURE_ENCODINGS,
    TARGET_KINDS,
    NoTargetsBlock,
    SampledBlock,
    TopkBlock,
)
from mtkd_cache.format.layout import ChunkGrid, chunk_of_row, chunk_rows, feature_grid
from mtkd_cache.format.loss_mask import LOSS_MASK
from mtkd_cache.format.meta import FeatureSpec, InputsMeta, Manifest, TeacherMeta, content_hash
from mtkd_cache.format.packing import DOC_START, doc_start_marks
from mtkd_cache.format.shards import ShardedArray
from mtkd_cache.format.store import CacheStore

__all__ = ["CacheReader", "ChunkData", "SampledBlock", "TeacherReader", "TopkBlock", "open_cache"]


@dataclass
class ChunkData:
    """Everything stored for one chunk, restricted to its real rows.

    Token-grid arrays have `sum(lengths)` rows, sample `i` at `offsets[i]:offsets[i]+lengths[i]`;
    sample-grid arrays (classification teachers, pooled features, array inputs) have one row per
    sample.
    """

    chunk: int
    sample_ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    domains: np.ndarray | None
    targets: dict[str, TopkBlock | SampledBlock | NoTargetsBlock] = field(default_factory=dict)
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class TeacherReader:
    """Random and chunked access to one complete teacher's arrays, checked on every read.

    Args:
        check: Check every read (missing chunks, value sanity). Off only to measure its cost.
    """

    def __init__(self, store: CacheStore, meta: TeacherMeta, inputs: InputsMeta, *, check: bool = True):
        self.store, self.meta, self.inputs, self.check = store, meta, inputs, check
        self.key = f"teachers/{meta.name}"
        self.tag = content_hash(meta.to_dict())
        self.group = store.open_group(self.key, mode="r", strict=check, tag=self.tag)
        self._arrays: dict[str, Any] = {}

    def _array(self, key: str) -> Any:
        """The group's array `key`, opened once (opening reads metadata, which is then fixed)."""
        if key not in self._arrays:
            try:
                self._arrays[key] = ShardedArray(self.store, f"{self.key}/{key}", self.group[key],
                                                   strict=self.check, tag=self.tag)
            except KeyError as e:
                raise CacheCorruptError(f"teacher {self.meta.name!r} array {key!r}: its zarr metadata "
                                        f"({self.store.path(self.key + '/' + key + '/zarr.json')}) is missing; "
                                        f"{teacher_fix(self.store.url, self.meta.name)}") from e
            except ValueError as e:  # invalid JSON, an unknown codec, shapes that do not fit
                raise metadata_error(self.store.path(f"{self.key}/{key}/zarr.json"), e,
                                     teacher_metadata_fix(self.store.url, self.meta.name)) from e
        return self._arrays[key]

    def _read(self, names: Sequence[str], start: int, stop: int, on: str) -> dict[str, np.ndarray]:
        return {n: read_rows(self.store, self._array(n), owner=f"teacher {self.meta.name!r}", group_key=self.key,
                             name=n, start=start, stop=stop, grid=self.inputs.grid, on=on,
                             fix=teacher_fix(self.store.url, self.meta.name)) for n in names}

    def _checked(self, bad: tuple[str, str] | None, prefix: str, start: int, on: str) -> None:
        if bad is not None:
            array = f"{prefix}{bad[0]}"
            chunk = chunk_of_row(self.inputs.grid, start, on)
            raise corrupt_error(self.store, f"teacher {self.meta.name!r}", f"{self.key}/{array}", array, chunk,
                                len(self._array(array).shape), bad[1], teacher_fix(self.store.url, self.meta.name))

    def rows_of_chunk(self, chunk: int, grid: str | None = None) -> tuple[int, int]:
        """Rows [r0, r1) chunk `chunk` reserves on `grid` (default: the teacher's)."""
        return chunk_rows(self.inputs.grid, chunk, grid or self.meta.grid)

    def read_targets(self, start: int, stop: int) -> TopkBlock | SampledBlock | NoTargetsBlock:
        """Decoded targets for rows [start, stop) of this teacher's grid."""
        kind = TARGET_KINDS[self.meta.target.kind]
        raw = self._read([a.name for a in kind.arrays(self.meta)], start, stop, self.meta.grid)
        if self.check:
            self._checked(kind.check(self.meta, raw), "", start, self.meta.grid)
        return kind.decode(self.meta, raw)

    def feature_spec(self, layer: int) -> FeatureSpec:
        for f in self.meta.features:
            if f.layer == layer:
                return f
        raise CacheMismatchError(
            f"teacher {self.meta.name!r} has no cached feature layer {layer}; cached layers are "
            f"{[f.layer for f in self.meta.features]} — re-run `mtkd-cache run` with --features to add it"
        )

    def feature_grid(self, layer: int) -> str:
        """"token" or "sample": where feature `layer`'s rows live."""
        return feature_grid(self.meta.grid, self.feature_spec(layer).pool)

    def read_feature(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Feature rows [start, stop) as float32 (int8 codes are dequantised with their row scale)."""
        spec = self.feature_spec(layer)
        enc, on = FEATURE_ENCODINGS[spec.dtype], self.feature_grid(layer)
        raw = self._read([f"features/{a.name}" for a in enc.arrays(spec)], start, stop, on)
        raw = {k.removeprefix("features/"): v for k, v in raw.items()}
        if self.check:
            self._checked(enc.check(spec, raw), "features/", start, on)
        return enc.decode(spec, raw)


class CacheReader:
    """A cache opened for reading. Use `open_cache` to make one.

    Args:
        store: The cache.
        check: Check every read (see format/checks.py). Off only to measure what checking costs.
    """

    def __init__(self, store: CacheStore, *, check: bool = True):
        self.store, self.check = store, check
        if not store.exists("manifest.json"):
            hint = (" (inputs were started but never finished: re-run `mtkd-cache prepare`)"
                    if store.exists("inputs") else "")
            raise CacheNotFoundError(f"{store.url} is not an mtkd cache: manifest.json is missing{hint}")
        self.manifest = Manifest.from_dict(store.read_json("manifest.json"), url=store.url)
        self.inputs = InputsMeta.from_dict(store.read_json("inputs/inputs.json"))
        if self.inputs.dataset_fingerprint != self.manifest.dataset_fingerprint:
            raise CacheMismatchError(
                f"{store.url}: manifest fingerprint {self.manifest.dataset_fingerprint} differs from the "
                f"inputs' {self.inputs.dataset_fingerprint}; the inputs were replaced mid-way — re-run prepare"
            )
        self._teachers: dict[str, TeacherReader] = {}
        self._input_arrays: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"CacheReader({self.store.url!r}, samples={self.inputs.num_samples}, "
                f"positions={self.inputs.num_positions}, teachers={self.teacher_names})")

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def grid(self) -> ChunkGrid:
        return self.inputs.grid

    @property
    def num_chunks(self) -> int:
        return self.inputs.grid.num_chunks

    @cached_property
    def samples(self) -> pa.Table:
        """The sample table (one row per sample; see docs/FORMAT.md)."""
        try:
            return self.store.read_table("inputs/samples.parquet")
        except (pa.ArrowException, OSError) as e:
            raise CacheCorruptError(f"{self.store.path('inputs/samples.parquet')} is unreadable "
                                    f"({type(e).__name__}); {inputs_fix(self.url)}") from e

    @cached_property
    def sample_columns(self) -> dict[str, np.ndarray | None]:
        """`sample_id`, `offset`, `num_positions`, `label` (-100 = none) and `domain` codes as arrays."""
        t = self.samples
        out: dict[str, np.ndarray | None] = {
            c: t.column(c).to_numpy(zero_copy_only=False) for c in ("sample_id", "offset", "num_positions")}
        out["label"] = t.column("label").fill_null(-100).to_numpy() if self.inputs.has_labels else None
        out["domain"] = None
        if self.inputs.domains:
            codes = {d: i for i, d in enumerate(self.inputs.domains)}
            out["domain"] = np.array([codes.get(d, -1) if d is not None else -1
                                      for d in t.column("domain").to_pylist()], dtype=np.int64)
        return out

    @property
    def _columns(self) -> dict[str, Any]:
        return self.sample_columns

    @property
    def teacher_names(self) -> list[str]:
        """Complete teachers: the folders under `teachers/` that hold a `teacher.json`."""
        return self.store.teachers_with("teacher.json")

    def incomplete_teachers(self) -> list[str]:
        """Teacher groups on storage that are not (yet) complete."""
        done = set(self.teacher_names)
        return [n for n in self.store.subdirs("teachers") if n not in done]

    def teacher(self, name: str) -> TeacherReader:
        """The reader of complete teacher `name`, after checking its teacher.json (see `check_teacher_json`)."""
        if name in self._teachers:
            return self._teachers[name]
        key, store = f"teachers/{name}/teacher.json", self.teacher_store(name)
        if "/" in name or "\\" in name or not store.exists(key):
            state = "is incomplete (its run did not finish; re-run `mtkd-cache run` with the same arguments)" \
                if name in self.incomplete_teachers() else "is not in this cache"
            raise CacheIncompleteError(
                f"teacher {name!r} {state}; complete teachers in {self.url}: {self.teacher_names}")
        raw = store.read_json(key)
        if self.check:
            check_teacher_json(store, name, raw)
        meta = TeacherMeta.from_dict(raw)
        if meta.dataset_fingerprint != self.inputs.dataset_fingerprint:
            raise CacheMismatchError(
                f"teacher {name!r} was cached from dataset fingerprint {meta.dataset_fingerprint}, this "
                f"cache's inputs are {self.inputs.dataset_fingerprint}; re-run `mtkd-cache run` on this cache")
        if self.inputs.packed and meta.task == "causal_lm" and meta.documents != "isolated":
            raise CacheMismatchError(
                f"teacher {name!r} was cached on these packed inputs before mtkd isolated packed documents: its "
                f"targets saw the other documents of each sample; re-run it with `mtkd-cache run {self.url} "
                f"--teacher {name} ... --overwrite`")
        inputs = self.inputs
        if meta.tokenization is not None:  # on its own tokenization's grid (docs/CROSS_TOKENIZER.md)
            from mtkd_cache.format.tokenization import TokenizationReader

            inputs = TokenizationReader(self, meta.tokenization).inputs
        self._teachers[name] = TeacherReader(store, meta, inputs, check=self.check)
        return self._teachers[name]

    def teacher_store(self, name: str) -> CacheStore:
        """Where teacher `name` is stored: this cache (an overlay keeps its own teachers elsewhere)."""
        return self.store

    def tokenization_store(self, tid: str) -> CacheStore:
        """Where tokenization `tid` is stored: this cache (an overlay may keep its own)."""
        return self.store

    @property
    def write_store(self) -> CacheStore:
        """Where a run writes what it builds (teachers, tokenizations): this cache, or an overlay's own folder."""
        return self.store

    @property
    def teachers(self) -> dict[str, TeacherMeta]:
        return {n: self.teacher(n).meta for n in self.teacher_names}

    # -- inputs ----------------------------------------------------------------------------------
    def chunk_of(self, sample_id: int) -> int:
        return self.inputs.grid.chunk_of_sample(sample_id)

    def read_chunk(self, chunk: int, teachers: Sequence[str] = (),
                   features: Mapping[str, Sequence[int]] | None = None) -> ChunkData:
        """Inputs, labels, targets and features of one chunk (real rows only), each read checked."""
        g = self.inputs.grid
        if not 0 <= chunk < g.num_chunks:
            raise IndexError(f"chunk {chunk} is out of range [0, {g.num_chunks})")
        s0, s1 = g.sample_range(chunk)
        cols = self.sample_columns
        on = "token" if self.inputs.kind == "tokens" else "sample"
        offsets = cols["offset"][s0:s1] - chunk_rows(g, chunk, on)[0]  # type: ignore[index]
        lengths = cols["num_positions"][s0:s1].astype(np.int64)  # type: ignore[index]
        used = int(offsets[-1] + lengths[-1]) if len(offsets) else 0
        labels, domains = cols["label"], cols["domain"]
        data = ChunkData(
            chunk=chunk, sample_ids=cols["sample_id"][s0:s1], offsets=offsets, lengths=lengths,  # type: ignore[index]
            inputs=self._read_inputs(chunk, used, s1 - s0),
            labels=None if labels is None else labels[s0:s1],
            domains=None if domains is None else domains[s0:s1],
        )

        def rows(grid: str) -> tuple[int, int]:
            r0 = chunk_rows(g, chunk, grid)[0]
            return r0, r0 + (used if grid == "token" else s1 - s0)

        for name in teachers:
            tr = self.teacher(name)
            if tr.meta.tokenization is not None:
                raise CacheMismatchError(
                    f"teacher {name!r} is cached on its own tokenization {tr.meta.tokenization!r}, not on the inputs' "
                    f"rows; read it aligned with `mtkd_train.data._align.read_chunk_aligned` (the trainer, evaluation and scoring do)")
            data.targets[name] = tr.read_targets(*rows(tr.meta.grid))
        for name, layers in (features or {}).items():
            tr = self.teacher(name)
            data.features[name] = {tr.feature_spec(layer).name: tr.read_feature(layer, *rows(tr.feature_grid(layer)))
                                   for layer in layers}
        return data

    def _input_rows(self, key: str, start: int, stop: int, on: str) -> np.ndarray:
        """Rows [start, stop) of the inputs' array `key`, checked (finished inputs never change)."""
        if key not in self._input_arrays:
            try:
                arr = self.store.open_group("inputs", mode="r", strict=self.check,
                                            tag=self.inputs.dataset_fingerprint)[key]
                self._input_arrays[key] = ShardedArray(self.store, f"inputs/{key}", arr, strict=self.check,
                                                       tag=self.inputs.dataset_fingerprint)
            except ValueError as e:  # a damaged zarr.json
                raise metadata_error(self.store.path(f"inputs/{key}/zarr.json"), e, inputs_fix(self.store.url)) from e
        return read_rows(self.store, self._input_arrays[key], owner="inputs", group_key="inputs", name=key,
                         start=start, stop=stop, grid=self.inputs.grid, on=on, fix=inputs_fix(self.url))

    def _read_inputs(self, chunk: int, used: int, n: int) -> dict[str, np.ndarray]:
        g = self.inputs.grid
        if self.inputs.kind == "tokens":
            p0 = chunk_rows(g, chunk, "token")[0]
            out = {"token_ids": self._input_rows("token_ids", p0, p0 + used, "token").astype(np.int64)}
            out.update(self._token_extras(chunk, p0, used))
            return out
        s0 = chunk_rows(g, chunk, "sample")[0]
        return {k: self._input_rows(f"arrays/{k}", s0, s0 + n, "sample") for k in self.inputs.arrays}

    def _token_extras(self, chunk: int, p0: int, used: int) -> dict[str, np.ndarray]:
        """The loss mask (when stored) and, for packed inputs, the document-start marks of a chunk's rows."""
        out: dict[str, np.ndarray] = {}
        if LOSS_MASK in self.inputs.arrays:
            out[LOSS_MASK] = self._input_rows(LOSS_MASK, p0, p0 + used, "token").astype(bool)
        if self.inputs.packed:
            s0, s1 = self.inputs.grid.sample_range(chunk)
            out[DOC_START] = doc_start_marks(self.samples.column("doc_starts").slice(s0, s1 - s0).to_pylist(),
                                             self.sample_columns["num_positions"][s0:s1])  # type: ignore[index,arg-type]
        return out

    def sample(self, sample_id: int, teachers: Sequence[str] = ()) -> dict[str, Any]:
        """Random access to one sample: its inputs, label, domain and each teacher's targets."""
        if not 0 <= sample_id < self.inputs.num_samples:
            raise IndexError(f"sample id {sample_id} is out of range [0, {self.inputs.num_samples})")
        cols = self.sample_columns
        off, n = int(cols["offset"][sample_id]), int(cols["num_positions"][sample_id])  # type: ignore[index]
        out: dict[str, Any] = {"sample_id": sample_id, "num_positions": n}
        if self.inputs.kind == "tokens":
            out["token_ids"] = self._input_rows("token_ids", off, off + n, "token").astype(np.int64)
            if LOSS_MASK in self.inputs.arrays:
                out[LOSS_MASK] = self._input_rows(LOSS_MASK, off, off + n, "token").astype(bool)
        else:
            out.update({k: self._input_rows(f"arrays/{k}", off, off + 1, "sample")[0] for k in self.inputs.arrays})
        labels = cols["label"]
        out["label"] = None if labels is None else int(labels[sample_id])
        out["targets"] = {}
        for name in teachers:
            tr = self.teacher(name)
            r0, r1 = (off, off + n) if tr.meta.grid == "token" else (sample_id, sample_id + 1)
            out["targets"][name] = tr.read_targets(r0, r1)
        return out

    def tokenizer_dir(self) -> str:
        """A local folder with the inputs' tokenizer files (downloaded for remote caches)."""
        if self.inputs.tokenizer is None:
            raise CacheMismatchError(f"{self.url} holds array inputs, which have no tokenizer")
        key = self.inputs.tokenizer.path
        if self.store.is_local:
            return self.store.path(key)
        d = tempfile.mkdtemp(prefix="mtkd-tok-")
        for fname in self.store.listdir(key):
            with open(os.path.join(d, fname), "wb") as f:
                f.write(self.store.read_bytes(f"{key}/{fname}"))
        return d

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir())


def open_cache(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
               check: bool = True) -> CacheReader:
    """Open a cache for reading (never writes to it).

    Args:
        url: Local path or fsspec URL of the cache.
        storage_options: Passed to fsspec (credentials, endpoints).
        check: Check every read (default); off only to measure what checking costs.

    Raises:
        CacheNotFoundError: no manifest there. CacheFormatError: corrupt or unknown-version manifest
            (a version-1 cache is refused with the `mtkd-cache migrate` command that upgrades it).
    """
    store = CacheStore(url, storage_options)
    from mtkd_cache.format.overlay import is_overlay, open_overlay  # overlay.py imports this module

    if is_overlay(store):
        return open_overlay(store, check=check)
    return CacheReader(store, check=check)
