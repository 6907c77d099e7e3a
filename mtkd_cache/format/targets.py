"""Writing one teacher's targets: `TeacherWriter`, resumable chunk by chunk.

Protocol (docs/FORMAT.md, "Writing and resuming"):
1. `_run.json` records the settings of the run in progress; a later run with other settings is
   refused unless `overwrite`.
2. Each chunk's rows are written whole (one shard per array), then its commit marker
   `_commits/<chunk>.json` with the checksums of what was written. A chunk without a marker is
   recomputed on resume, so a kill at any moment loses at most the chunks in flight.
3. `finish` gathers the markers into `chunks.parquet`, writes `teacher.json` (last of the group)
   and adds the teacher to the manifest. Until then every reader treats the teacher as incomplete.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from mtkd_cache._version import __version__
from mtkd_cache.errors import CacheExistsError, CacheIncompleteError
from mtkd_cache.format.codecs import (
    array_checksum,
    compressor_from_dict,
    encode_values,
    quantize_rows_int8,
    value_dtype,
)
from mtkd_cache.format.meta import InputsMeta, Manifest, TeacherMeta
from mtkd_cache.format.store import CacheStore, now_iso

__all__ = ["TeacherWriter", "update_manifest"]


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: stored {a.get(k)!r} vs requested {b.get(k)!r}" for k in keys)


def update_manifest(store: CacheStore, add: Iterable[str] = (), remove: Iterable[str] = ()) -> Manifest:
    """Read-modify-write the manifest's teacher list (the manifest is always written last)."""
    m = Manifest.from_dict(store.read_json("manifest.json"))
    names = (set(m.teachers) | set(add)) - set(remove)
    if names == set(m.teachers):
        return m  # nothing changes: no rewrite, so a no-op cannot race another writer's update
    new = replace(m, teachers=tuple(sorted(names)), updated=now_iso(), mtkd_version=__version__)
    store.write_json("manifest.json", new.to_dict())
    return new


class TeacherWriter:
    """Context manager writing a teacher group; see the module docstring for the protocol.

    Args:
        store: The cache.
        meta: The teacher's settings (stats are filled in by `finish`).
        inputs: The cache's inputs metadata (gives the chunk grid).
        overwrite: Replace a teacher group stored with other settings.
        create: Create the arrays (False on non-zero ranks, which open what rank 0 created).
    """

    def __init__(self, store: CacheStore, meta: TeacherMeta, inputs: InputsMeta, *,
                 overwrite: bool = False, create: bool = True):
        self.store, self.meta, self.inputs = store, meta, inputs
        self.key = f"teachers/{meta.name}"
        self.already_complete = False
        if create:
            self._claim(overwrite)
        if not self.already_complete:
            self.group = store.open_group(self.key, mode="a" if not create else "a")
            if create and "indices" not in self.group:
                self._create_arrays()

    # -- set-up ----------------------------------------------------------------------------------
    def _claim(self, overwrite: bool) -> None:
        want = self.meta.settings()
        for marker in ("teacher.json", "_run.json"):
            key = f"{self.key}/{marker}"
            if not self.store.exists(key):
                continue
            stored = self.store.read_json(key)
            have = TeacherMeta.from_dict(stored).settings() if marker == "teacher.json" else stored
            if have == want and not overwrite:
                self.already_complete = marker == "teacher.json"
                if self.already_complete:  # make sure the manifest lists it (a lost race, a crash)
                    update_manifest(self.store, add=[self.meta.name])
                return
            if not overwrite:
                raise CacheExistsError(
                    f"teacher {self.meta.name!r} already exists in {self.store.url} with other settings "
                    f"({_diff(have, want)}); pass --overwrite to replace it or choose another --teacher name")
            break
        update_manifest(self.store, remove=[self.meta.name])
        self.store.remove(self.key)
        self.store.write_json(f"{self.key}/_run.json", want)

    def _create_arrays(self) -> None:
        g, m = self.inputs.grid, self.meta
        comp = compressor_from_dict(m.compressor)
        if m.grid == "token":
            rows, shard, inner = g.total_positions, g.chunk_positions, g.inner_positions
        else:
            rows, shard, inner = g.total_sample_rows, g.chunk_samples, g.inner_samples
        w = m.target.width

        def make(name: str, shape: tuple[int, ...], dtype: str, grid_rows: tuple[int, int, int]) -> None:
            n, sh, inn = grid_rows
            self.group.create_array(name, shape=(n, *shape), dtype=dtype, chunks=(inn, *shape),
                                    shards=(sh, *shape), compressors=comp, fill_value=0, overwrite=True)

        dims = (rows, shard, inner)
        make("indices", (w,), m.index_dtype, dims)
        if m.target.kind == "topk":
            make("values", (w,), value_dtype(m.values), dims)
            make("tail", (), m.tail_dtype, dims)
        else:
            make("counts", (w,), "uint16", dims)
        for f in m.features:
            fdims = dims if (f.pool == "none" and m.grid == "token") else (g.total_sample_rows, g.chunk_samples, g.inner_samples)
            make(f"features/{f.name}", (f.dim,), f.dtype, fdims)
            if f.dtype == "int8":
                make(f"features/{f.name}_scale", (), "float32", fdims)

    # -- chunks ----------------------------------------------------------------------------------
    def committed(self) -> set[int]:
        return {int(n.split(".")[0]) for n in self.store.listdir(f"{self.key}/_commits") if n.endswith(".json")}

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Uncommitted chunks this rank owns: contiguous ranges, rank r takes the r-th share."""
        n = self.inputs.grid.num_chunks
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        done = self.committed()
        return [c for c in range(lo, hi) if c not in done]

    def _region(self, chunk: int, grid: str) -> tuple[int, int]:
        g = self.inputs.grid
        return g.position_range(chunk) if grid == "token" else (chunk * g.chunk_samples, (chunk + 1) * g.chunk_samples)

    def _put(self, name: str, chunk: int, grid: str, rows: np.ndarray, checks: dict[str, str]) -> None:
        arr = self.group[name]
        assert isinstance(arr, zarr.Array), f"{name} is a group, expected an array"
        r0, r1 = self._region(chunk, grid)
        block = np.zeros((r1 - r0, *arr.shape[1:]), dtype=arr.dtype)
        block[: len(rows)] = rows
        arr[r0:r1] = block
        checks[name] = array_checksum(block)

    def write_chunk(self, chunk: int, *, indices: np.ndarray, logp: np.ndarray | None = None,
                    tail: np.ndarray | None = None, counts: np.ndarray | None = None,
                    features: Mapping[int, np.ndarray] | None = None, stats: Mapping[str, float] | None = None) -> None:
        """Write one chunk's real rows (decoded values; encoding happens here) and commit it.

        Args:
            indices: (R, W) token ids. logp / tail: (R, W) and (R,) for top-k.
            counts: (R, W) draw counts for sampled targets.
            features: layer -> (R, D) per-position or (n_samples, D) pooled rows, float.
            stats: additive per-chunk statistics (e.g. positions, tail_sum, entropy_sum).
        """
        m = self.meta
        checks: dict[str, str] = {}
        self._put("indices", chunk, m.grid, indices.astype(m.index_dtype), checks)
        if m.target.kind == "topk":
            assert logp is not None and tail is not None
            self._put("values", chunk, m.grid, encode_values(logp, m.values), checks)
            self._put("tail", chunk, m.grid, np.asarray(tail, dtype=m.tail_dtype), checks)
        else:
            assert counts is not None
            self._put("counts", chunk, m.grid, counts.astype(np.uint16), checks)
        for spec in m.features:
            x = (features or {})[spec.layer]
            grid = "token" if (spec.pool == "none" and m.grid == "token") else "sample"
            if spec.dtype == "int8":
                q, scale = quantize_rows_int8(x)
                self._put(f"features/{spec.name}", chunk, grid, q, checks)
                self._put(f"features/{spec.name}_scale", chunk, grid, scale, checks)
            else:
                self._put(f"features/{spec.name}", chunk, grid, np.asarray(x, dtype=np.float16), checks)
        marker = {"chunk": chunk, "rows": int(len(indices)), "checksums": checks, "stats": dict(stats or {}),
                  "time": time.time()}
        self.store.write_json(f"{self.key}/_commits/{chunk:08d}.json", marker)

    # -- finish ----------------------------------------------------------------------------------
    def finish(self, extra_stats: Mapping[str, Any] | None = None) -> TeacherMeta:
        """Check every chunk is committed, then write chunks.parquet, teacher.json and the manifest."""
        n = self.inputs.grid.num_chunks
        missing = sorted(set(range(n)) - self.committed())
        if missing:
            raise CacheIncompleteError(
                f"teacher {self.meta.name!r}: chunks {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                f"committed; re-run `mtkd-cache run` with the same arguments to finish them")
        rows: list[dict[str, Any]] = []
        totals: dict[str, float] = {}
        for c in range(n):
            marker = self.store.read_json(f"{self.key}/_commits/{c:08d}.json")
            for arr, cs in sorted(marker["checksums"].items()):
                rows.append({"chunk": c, "array": arr, "checksum": cs, "rows": marker["rows"]})
            for k, v in marker["stats"].items():
                totals[k] = totals.get(k, 0.0) + float(v)
        self.store.write_table(f"{self.key}/chunks.parquet", pa.Table.from_pylist(rows))
        stats = _summarise(totals)
        stats["bytes"] = self.store.size_of(self.key)
        positions = max(1, int(totals.get("positions", 0)))
        stats["bytes_per_position"] = stats["bytes"] / positions
        stats.update(extra_stats or {})
        meta = replace(self.meta, stats=stats, mtkd_version=__version__, created=now_iso())
        self.store.write_json(f"{self.key}/teacher.json", meta.to_dict())
        update_manifest(self.store, add=[meta.name])
        self.meta = meta
        return meta

    def __enter__(self) -> TeacherWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _summarise(totals: Mapping[str, float]) -> dict[str, Any]:
    n = max(1.0, totals.get("positions", 0.0))
    out: dict[str, Any] = {"positions": int(totals.get("positions", 0))}
    for key in ("tail", "entropy", "top1_prob"):
        if f"{key}_sum" in totals:
            out[f"mean_{key}"] = totals[f"{key}_sum"] / n
    return out


