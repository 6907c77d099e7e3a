"""Reading a cache: `open_cache(url)` returns a `CacheReader`.

The manifest is read first and its format version checked; only teachers whose `teacher.json`
exists and that the manifest lists are complete. Reads go chunk by chunk (sequential) or by
sample id (random access); each decodes only the zarr inner chunks it touches.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from mtkd_cache.errors import CacheIncompleteError, CacheMismatchError, CacheNotFoundError
from mtkd_cache.format.codecs import decode_values
from mtkd_cache.format.meta import FeatureSpec, InputsMeta, Manifest, TeacherMeta
from mtkd_cache.format.store import CacheStore

__all__ = ["CacheReader", "ChunkData", "SampledBlock", "TeacherReader", "TopkBlock", "open_cache"]


class TopkBlock(NamedTuple):
    """Top-k targets for R rows: indices (R, K) int64, logp (R, K) float32, tail (R,) float32."""

    indices: np.ndarray
    logp: np.ndarray
    tail: np.ndarray


class SampledBlock(NamedTuple):
    """Sampled targets for R rows: indices (R, n) int64 and counts (R, n) int32 (0 = padding)."""

    indices: np.ndarray
    counts: np.ndarray


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
    targets: dict[str, TopkBlock | SampledBlock] = field(default_factory=dict)
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class TeacherReader:
    """Random and chunked access to one complete teacher's arrays."""

    def __init__(self, store: CacheStore, meta: TeacherMeta, inputs: InputsMeta):
        self.store, self.meta, self.inputs = store, meta, inputs
        self.group = store.open_group(f"teachers/{meta.name}", mode="r")
        self._arrays: dict[str, Any] = {}

    def _array(self, key: str) -> Any:
        """The group's array `key`, opened once (opening reads metadata, which is then fixed)."""
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    def rows_of_chunk(self, chunk: int, grid: str | None = None) -> tuple[int, int]:
        g = self.inputs.grid
        if (grid or self.meta.grid) == "token":
            return g.position_range(chunk)
        start = chunk * g.chunk_samples
        return start, start + g.chunk_samples

    def read_targets(self, start: int, stop: int) -> TopkBlock | SampledBlock:
        """Decoded targets for rows [start, stop) of this teacher's grid."""
        idx = self._array("indices")[start:stop].astype(np.int64)
        if self.meta.target.kind == "sample":
            return SampledBlock(idx, self._array("counts")[start:stop].astype(np.int32))
        logp = decode_values(self._array("values")[start:stop], self.meta.values)
        tail = self._array("tail")[start:stop].astype(np.float32)
        return TopkBlock(idx, logp, tail)

    def feature_spec(self, layer: int) -> FeatureSpec:
        for f in self.meta.features:
            if f.layer == layer:
                return f
        raise CacheMismatchError(
            f"teacher {self.meta.name!r} has no cached feature layer {layer}; cached layers are "
            f"{[f.layer for f in self.meta.features]} — re-run `mtkd-cache run` with --features to add it"
        )

    def read_feature(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Feature rows [start, stop) as float32 (int8 codes are dequantised with their row scale)."""
        spec = self.feature_spec(layer)
        raw = self._array(f"features/{spec.name}")[start:stop]
        if spec.dtype == "int8":
            scale = self._array(f"features/{spec.name}_scale")[start:stop].astype(np.float32)
            return raw.astype(np.float32) * scale[:, None]
        return raw.astype(np.float32)


class CacheReader:
    """A cache opened for reading. Use `open_cache` to make one."""

    def __init__(self, store: CacheStore):
        self.store = store
        if not store.exists("manifest.json"):
            hint = (" (inputs were started but never finished: re-run `mtkd-cache prepare`)"
                    if store.exists("inputs") else "")
            raise CacheNotFoundError(f"{store.url} is not an mtkd cache: manifest.json is missing{hint}")
        self.manifest = Manifest.from_dict(store.read_json("manifest.json"))
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
                f"positions={self.inputs.num_positions}, teachers={list(self.manifest.teachers)})")

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def grid(self):  # noqa: ANN201 - ChunkGrid
        return self.inputs.grid

    @property
    def num_chunks(self) -> int:
        return self.inputs.grid.num_chunks

    @cached_property
    def samples(self) -> pa.Table:
        """The sample table (one row per sample; see docs/FORMAT.md)."""
        return self.store.read_table("inputs/samples.parquet")

    @cached_property
    def _columns(self) -> dict[str, np.ndarray]:
        t = self.samples
        out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("sample_id", "offset", "num_positions")}
        labels = t.column("label")
        out["label"] = labels.fill_null(-100).to_numpy() if self.inputs.has_labels else None  # type: ignore[assignment]
        if self.inputs.domains:
            codes = {d: i for i, d in enumerate(self.inputs.domains)}
            out["domain"] = np.array([codes.get(d, -1) if d is not None else -1
                                      for d in t.column("domain").to_pylist()], dtype=np.int64)
        else:
            out["domain"] = None  # type: ignore[assignment]
        return out

    @property
    def teacher_names(self) -> list[str]:
        """Complete teachers (listed in the manifest)."""
        return sorted(self.manifest.teachers)

    def incomplete_teachers(self) -> list[str]:
        """Teacher groups on storage that are not (yet) complete."""
        return [n for n in self.store.subdirs("teachers") if n not in self.manifest.teachers]

    def teacher(self, name: str) -> TeacherReader:
        if name in self._teachers:
            return self._teachers[name]
        if name not in self.manifest.teachers:
            state = "is incomplete (its run did not finish; re-run `mtkd-cache run` with the same arguments)" \
                if name in self.incomplete_teachers() else "is not in this cache"
            raise CacheIncompleteError(
                f"teacher {name!r} {state}; complete teachers in {self.url}: {self.teacher_names}")
        meta = TeacherMeta.from_dict(self.store.read_json(f"teachers/{name}/teacher.json"))
        if meta.dataset_fingerprint != self.inputs.dataset_fingerprint:
            raise CacheMismatchError(
                f"teacher {name!r} was cached from dataset fingerprint {meta.dataset_fingerprint}, this "
                f"cache's inputs are {self.inputs.dataset_fingerprint}; re-run `mtkd-cache run` on this cache")
        self._teachers[name] = TeacherReader(self.store, meta, self.inputs)
        return self._teachers[name]

    @property
    def teachers(self) -> dict[str, TeacherMeta]:
        return {n: self.teacher(n).meta for n in self.teacher_names}

    # -- inputs ----------------------------------------------------------------------------------
    def chunk_of(self, sample_id: int) -> int:
        return self.inputs.grid.chunk_of_sample(sample_id)

    def read_chunk(self, chunk: int, teachers: Sequence[str] = (),
                   features: Mapping[str, Sequence[int]] | None = None) -> ChunkData:
        """Inputs, labels, targets and features of one chunk (real rows only)."""
        g = self.inputs.grid
        if not 0 <= chunk < g.num_chunks:
            raise IndexError(f"chunk {chunk} is out of range [0, {g.num_chunks})")
        s0, s1 = g.sample_range(chunk)
        cols = self._columns
        offsets = cols["offset"][s0:s1] - (chunk * (g.chunk_positions if self.inputs.kind == "tokens" else g.chunk_samples))
        lengths = cols["num_positions"][s0:s1].astype(np.int64)
        used = int(offsets[-1] + lengths[-1]) if len(offsets) else 0
        data = ChunkData(
            chunk=chunk, sample_ids=cols["sample_id"][s0:s1], offsets=offsets, lengths=lengths,
            inputs=self._read_inputs(chunk, used, s1 - s0),
            labels=None if cols["label"] is None else cols["label"][s0:s1],
            domains=None if cols["domain"] is None else cols["domain"][s0:s1],
        )
        for name in teachers:
            tr = self.teacher(name)
            r0, _ = tr.rows_of_chunk(chunk)
            n = used if tr.meta.grid == "token" else s1 - s0
            data.targets[name] = tr.read_targets(r0, r0 + n)
        for name, layers in (features or {}).items():
            tr = self.teacher(name)
            data.features[name] = {}
            for layer in layers:
                spec = tr.feature_spec(layer)
                grid = "token" if (spec.pool == "none" and tr.meta.grid == "token") else "sample"
                r0, _ = tr.rows_of_chunk(chunk, grid)
                n = used if grid == "token" else s1 - s0
                data.features[name][spec.name] = tr.read_feature(layer, r0, r0 + n)
        return data

    def _input_array(self, key: str) -> Any:
        """The inputs group's array `key`, opened once (finished inputs never change)."""
        if key not in self._input_arrays:
            self._input_arrays[key] = self.store.open_group("inputs", mode="r")[key]
        return self._input_arrays[key]

    def _read_inputs(self, chunk: int, used: int, n: int) -> dict[str, np.ndarray]:
        g = self.inputs.grid
        if self.inputs.kind == "tokens":
            p0 = chunk * g.chunk_positions
            return {"token_ids": self._input_array("token_ids")[p0 : p0 + used].astype(np.int64)}
        s0 = chunk * g.chunk_samples
        return {k: self._input_array(f"arrays/{k}")[s0 : s0 + n] for k in self.inputs.arrays}

    def sample(self, sample_id: int, teachers: Sequence[str] = ()) -> dict[str, Any]:
        """Random access to one sample: its inputs, label, domain and each teacher's targets."""
        if not 0 <= sample_id < self.inputs.num_samples:
            raise IndexError(f"sample id {sample_id} is out of range [0, {self.inputs.num_samples})")
        cols = self._columns
        off, n = int(cols["offset"][sample_id]), int(cols["num_positions"][sample_id])
        out: dict[str, Any] = {"sample_id": sample_id, "num_positions": n}
        if self.inputs.kind == "tokens":
            out["token_ids"] = self._input_array("token_ids")[off : off + n].astype(np.int64)
        else:
            out.update({k: self._input_array(f"arrays/{k}")[off] for k in self.inputs.arrays})
        out["label"] = None if cols["label"] is None else int(cols["label"][sample_id])
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


def open_cache(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> CacheReader:
    """Open a cache for reading.

    Args:
        url: Local path or fsspec URL of the cache.
        storage_options: Passed to fsspec (credentials, endpoints).

    Raises:
        CacheNotFoundError: no manifest there. CacheFormatError: corrupt or unknown-version manifest.
    """
    return CacheReader(CacheStore(url, storage_options))
