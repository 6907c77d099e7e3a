"""Writing one teacher's targets: `TeacherWriter`, resumable chunk by chunk.

Protocol (docs/FORMAT.md, "Writing and resuming"):
1. Every array of the group is created, then `_run.json` records the settings of the run in
   progress. A group without `_run.json` was killed while its arrays were being created and is
   started afresh; a later run with other settings is refused unless `overwrite`.
2. Each chunk's rows are written whole (one shard per array, every shard stored), then its
   commit marker `_commits/<chunk>.json` with the checksums of what was written and the hash of
   the settings. A chunk without a marker is recomputed on resume, so a kill at any moment loses
   at most the chunks in flight.
3. `finish` gathers the markers into `chunks.parquet` (whose metadata holds the sha256 of the
   coming `teacher.json`), then writes `teacher.json`. That file, written last and by this
   teacher alone, is the only record that the teacher is complete: no shared file is
   read-modified-written, so any number of concurrent writers never lose a teacher.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from mtkd_cache._version import __version__
from mtkd_cache.errors import CacheExistsError, CacheIncompleteError, CacheMismatchError
from mtkd_cache.format.checks import check_teacher_json
from mtkd_cache.format.codecs import array_checksum, chunk_codecs
from mtkd_cache.format.kinds import FEATURE_ENCODINGS, TARGET_KINDS, StoredArray, teacher_arrays
from mtkd_cache.format.layout import chunk_rows, feature_grid
from mtkd_cache.format.meta import (
    TEACHER_HASH_KEY,
    InputsMeta,
    TeacherMeta,
    TeacherStats,
    content_hash,
)
from mtkd_cache.format.store import CacheStore, now_iso

__all__ = ["MARKER_READERS", "TeacherWriter", "marker_key", "read_markers"]

_WRITE_ALL: Any = {"write_empty_chunks": True}  # every shard is stored, so an absent one was lost


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: stored {a.get(k)!r} vs requested {b.get(k)!r}" for k in keys)


MARKER_READERS = 16
"""Commit markers `finish` reads at once (threads): ~30k markers on an object store take seconds, not minutes."""


def read_markers(store: CacheStore, keys: Sequence[str], workers: int = MARKER_READERS) -> list[dict[str, Any]]:
    """`store.read_json` of every key, in order, `workers` at a time; the first failing key's error is raised."""
    if workers <= 1 or len(keys) <= 1:
        return [store.read_json(k) for k in keys]
    with ThreadPoolExecutor(min(workers, len(keys)), thread_name_prefix="mtkd-markers") as pool:
        return list(pool.map(store.read_json, keys))


def marker_key(teacher: str, chunk: int) -> str:
    """Key of the commit marker of `chunk` of `teacher`."""
    return f"teachers/{teacher}/_commits/{chunk:08d}.json"


class TeacherWriter:
    """Writes a teacher group (`write_chunk` per chunk, then `finish`); see the module docstring.

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
        self.arrays: list[StoredArray] = teacher_arrays(meta)
        self.already_complete = False
        if create:
            self._claim(overwrite)
        if not self.already_complete:
            self.group = store.open_group(self.key, mode="a")

    # -- set-up ----------------------------------------------------------------------------------
    def _claim(self, overwrite: bool) -> None:
        want = self.meta.settings()
        if not overwrite and self.store.exists(f"{self.key}/teacher.json"):
            raw = self.store.read_json(f"{self.key}/teacher.json")
            check_teacher_json(self.store, self.meta.name, raw)  # an edited file is damage, not "other settings"
            have = TeacherMeta.from_dict(raw).settings()
            if have != want:
                raise self._exists(have, want)
            self.already_complete = True
            return
        if not overwrite and self.store.exists(f"{self.key}/_run.json"):
            have = self.store.read_json(f"{self.key}/_run.json")
            if have != want:
                raise self._exists(have, want)
            if self._arrays_exist():
                return  # resume
        # nothing there, --overwrite, or killed while creating the arrays: start afresh
        self.store.remove(self.key)
        self._create_arrays()
        self.store.write_json(f"{self.key}/_run.json", want)

    def _exists(self, have: Mapping[str, Any], want: Mapping[str, Any]) -> CacheExistsError:
        return CacheExistsError(
            f"teacher {self.meta.name!r} already exists in {self.store.url} with other settings "
            f"({_diff(have, want)}); pass --overwrite to replace it or choose another --teacher name")

    def _arrays_exist(self) -> bool:
        return all(self.store.exists(f"{self.key}/{a.key}/zarr.json") for a in self.arrays)

    def _create_arrays(self) -> None:
        group = self.store.open_group(self.key, mode="a")
        codecs = chunk_codecs(self.meta.compressor)
        for a in self.arrays:
            rows, shard, inner = self.inputs.grid.shape_of(a.grid)
            group.create_array(a.key, shape=(rows, *a.row_shape), dtype=a.dtype, chunks=(inner, *a.row_shape),
                               shards=(shard, *a.row_shape), compressors=codecs, fill_value=0, overwrite=True)

    # -- chunks ----------------------------------------------------------------------------------
    def committed(self) -> set[int]:
        return {int(n.split(".")[0]) for n in self.store.listdir(f"{self.key}/_commits") if n.endswith(".json")}

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Uncommitted chunks this rank owns: contiguous ranges, rank r takes the r-th share."""
        n = self.inputs.grid.num_chunks
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        done = self.committed()
        return [c for c in range(lo, hi) if c not in done]

    def _put(self, name: str, chunk: int, grid: str, rows: np.ndarray, checks: dict[str, str]) -> None:
        arr: Any = self.group[name]
        r0, r1 = chunk_rows(self.inputs.grid, chunk, grid)
        block = np.zeros((r1 - r0, *arr.shape[1:]), dtype=arr.dtype)
        block[: len(rows)] = rows
        arr.with_config(_WRITE_ALL)[r0:r1] = block
        checks[name] = array_checksum(block)

    def write_chunk(self, chunk: int, *, indices: np.ndarray | None = None, logp: np.ndarray | None = None,
                    tail: np.ndarray | None = None, counts: np.ndarray | None = None,
                    features: Mapping[int, np.ndarray] | None = None, stats: Mapping[str, float] | None = None) -> None:
        """Write one chunk's real rows (decoded values; encoding happens here) and commit it.

        Args:
            indices: (R, W) token ids (None for a feature-only teacher, target kind `none`). logp / tail: (R, W) and (R,) for top-k.
            counts: (R, W) draw counts for sampled targets.
            features: layer -> (R, D) per-position or (n_samples, D) pooled rows, float.
            stats: additive per-chunk statistics (e.g. positions, tail_sum, entropy_sum).
        """
        m = self.meta
        given = {k: v for k, v in {"indices": indices, "logp": logp, "tail": tail, "counts": counts}.items()
                 if v is not None}
        checks: dict[str, str] = {}
        for name, block in TARGET_KINDS[m.target.kind].encode(m, given).items():
            self._put(name, chunk, m.grid, block, checks)
        for spec in m.features:
            if spec.layer not in (features or {}):
                raise ValueError(f"teacher {m.name!r} chunk {chunk}: feature layer {spec.layer} was not given")
            grid = feature_grid(m.grid, spec.pool)
            for name, block in FEATURE_ENCODINGS[spec.dtype].encode(spec, (features or {})[spec.layer]).items():
                self._put(f"features/{name}", chunk, grid, block, checks)
        rows = len(indices) if indices is not None else len(next(iter((features or {}).values()), ()))
        marker = {"chunk": chunk, "rows": int(rows), "checksums": checks, "stats": dict(stats or {}),
                  "settings_sha256": m.settings_hash(), "time": time.time()}
        self.store.write_json(marker_key(m.name, chunk), marker)

    # -- finish ----------------------------------------------------------------------------------
    def _markers(self) -> list[dict[str, Any]]:
        n = self.inputs.grid.num_chunks
        missing = sorted(set(range(n)) - self.committed())
        if missing:
            raise CacheIncompleteError(
                f"teacher {self.meta.name!r}: chunks {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                f"committed; re-run `mtkd-cache run` with the same arguments to finish them")
        markers = read_markers(self.store, [marker_key(self.meta.name, c) for c in range(n)])
        want = self.meta.settings_hash()
        stale = [int(mk["chunk"]) for mk in markers if mk.get("settings_sha256") != want]
        if stale:
            raise CacheMismatchError(
                f"teacher {self.meta.name!r}: chunks {stale[:10]} were committed under other settings; run "
                f"`mtkd-cache verify --repair {self.store.url}` and then `mtkd-cache run` again")
        return markers

    def finish(self) -> TeacherMeta:
        """Check every chunk is committed, then write chunks.parquet and, last, teacher.json."""
        rows: list[dict[str, Any]] = []
        totals: dict[str, float] = {}
        for marker in self._markers():
            for arr, cs in sorted(marker["checksums"].items()):
                rows.append({"chunk": int(marker["chunk"]), "array": arr, "checksum": cs, "rows": marker["rows"]})
            for k, v in marker["stats"].items():
                totals[k] = totals.get(k, 0.0) + float(v)
        # what finish itself writes is left out, so finishing twice reports the same bytes
        size = self.store.size_of(self.key) - sum(
            self.store.size_of(f"{self.key}/{name}") for name in ("chunks.parquet", "teacher.json"))
        positions = int(totals.get("positions", 0))
        stats = TeacherStats(positions=positions, bytes=size, bytes_per_position=size / max(1, positions),
                             **_means(totals))
        meta = replace(self.meta, stats=stats, mtkd_version=__version__, created=now_iso())
        table = pa.Table.from_pylist(rows)
        table = table.replace_schema_metadata({TEACHER_HASH_KEY: content_hash(meta.to_dict())})
        self.store.write_table(f"{self.key}/chunks.parquet", table)
        self.store.write_json(f"{self.key}/teacher.json", meta.to_dict())
        self.meta = meta
        return meta


def _means(totals: Mapping[str, float]) -> dict[str, float]:
    n = max(1.0, totals.get("positions", 0.0))
    return {f"mean_{key}": totals[f"{key}_sum"] / n for key in ("tail", "entropy", "top1_prob") if f"{key}_sum" in totals}

