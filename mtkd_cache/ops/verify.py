"""`verify_cache`: check a cache is complete and that every stored chunk matches its checksum.

It re-reads every chunk of the inputs and of each teacher, recomputes the content checksums
recorded at write time, re-hashes every sample and recomputes the dataset fingerprint. Cost: one
full read of the cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from mtkd_cache.errors import CacheFormatError, CacheNotFoundError
from mtkd_cache.format.codecs import array_checksum
from mtkd_cache.format.fingerprint import DatasetHasher, sample_content, sample_hash
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore

__all__ = ["VerifyReport", "verify_cache"]


@dataclass
class VerifyReport:
    """What `verify_cache` found. `ok` is True only when `problems` is empty."""

    url: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    teachers_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "problems": self.problems,
                "chunks_checked": self.chunks_checked, "teachers_checked": self.teachers_checked}


def _check_arrays(store: CacheStore, group_key: str, table_key: str, region: Any, report: VerifyReport,
                  what: str, bar: Any) -> None:
    try:
        rows = store.read_table(table_key).to_pylist()
    except (CacheNotFoundError, OSError) as e:
        report.problems.append(f"{what}: checksum table {table_key} is missing or unreadable ({e})")
        return
    group = store.open_group(group_key, mode="r")
    for row in rows:
        c, name = int(row["chunk"]), str(row["array"])
        r0, r1 = region(c, name)
        try:
            arr = group[name]
            assert isinstance(arr, zarr.Array), f"{name} is a group, expected an array"
            block = arr[r0:r1]
            got = array_checksum(np.asarray(block))
        except Exception as e:  # a corrupt shard surfaces as a codec error of any type
            report.problems.append(f"{what} chunk {c} array {name!r}: unreadable ({type(e).__name__}: {e})")
            continue
        if got != row["checksum"]:
            report.problems.append(f"{what} chunk {c} array {name!r}: checksum mismatch (stored data changed "
                                   f"or the chunk is missing); re-run the step that wrote it")
        report.chunks_checked += 1
        bar.update(1)


def _check_inputs(reader: CacheReader, report: VerifyReport, bar: Any) -> None:
    inputs, g = reader.inputs, reader.inputs.grid

    def region(c: int, name: str) -> tuple[int, int]:
        return g.position_range(c) if name == "token_ids" else (c * g.chunk_samples, (c + 1) * g.chunk_samples)

    _check_arrays(reader.store, "inputs", "inputs/chunks.parquet", region, report, "inputs", bar)
    if len(reader.samples) != inputs.num_samples:
        report.problems.append(f"inputs: sample table has {len(reader.samples)} rows, inputs.json says {inputs.num_samples}")
        return
    hashes = reader.samples.column("content_hash").to_pylist()
    labels = reader.samples.column("label").to_pylist()
    domains = reader.samples.column("domain").to_pylist()
    recomputed: list[str] = []
    for c in range(g.num_chunks):
        data = reader.read_chunk(c)
        for j, sid in enumerate(data.sample_ids):
            if inputs.kind == "tokens":
                toks = data.inputs["token_ids"][data.offsets[j] : data.offsets[j] + data.lengths[j]]
                arrays = [toks.astype(np.int64)]
            else:
                arrays = [data.inputs[k][j] for k in sorted(data.inputs)]
            h = sample_hash(sample_content(arrays, labels[sid], domains[sid]))
            recomputed.append(h)
            if h != hashes[sid]:
                report.problems.append(f"inputs chunk {c} sample {int(sid)}: content hash mismatch")
    settings = inputs.source.get("fingerprint_settings")
    if settings is None:
        report.problems.append("inputs: fingerprint settings are not recorded; cannot recompute the fingerprint")
        return
    hasher = DatasetHasher(settings)
    hasher.update(recomputed)
    if hasher.hexdigest() != inputs.dataset_fingerprint:
        report.problems.append(f"inputs: dataset fingerprint recomputes to {hasher.hexdigest()}, recorded "
                               f"{inputs.dataset_fingerprint}")


def _check_teacher(reader: CacheReader, name: str, report: VerifyReport, bar: Any) -> None:
    store, g = reader.store, reader.inputs.grid
    key = f"teachers/{name}"
    if name not in reader.manifest.teachers or not store.exists(f"{key}/teacher.json"):
        report.problems.append(f"teacher {name!r} is incomplete (no teacher.json or not in the manifest); "
                               f"re-run `mtkd-cache run` with the same arguments to finish it")
        return
    try:
        meta = TeacherMeta.from_dict(store.read_json(f"{key}/teacher.json"))
    except CacheFormatError as e:
        report.problems.append(f"teacher {name!r}: {e}")
        return
    if meta.dataset_fingerprint != reader.inputs.dataset_fingerprint:
        report.problems.append(f"teacher {name!r}: dataset fingerprint {meta.dataset_fingerprint} != inputs "
                               f"{reader.inputs.dataset_fingerprint}")
    sample_grid = {f"features/{f.name}" for f in meta.features if f.pool == "mean" or meta.grid == "sample"}
    sample_grid |= {f"{n}_scale" for n in sample_grid}

    def region(c: int, arr: str) -> tuple[int, int]:
        if meta.grid == "token" and arr not in sample_grid:
            return g.position_range(c)
        return c * g.chunk_samples, (c + 1) * g.chunk_samples

    before = len(report.problems)
    _check_arrays(store, key, f"{key}/chunks.parquet", region, report, f"teacher {name!r}", bar)
    table = store.read_table(f"{key}/chunks.parquet") if len(report.problems) == before else None
    if table is not None:
        seen = set(table.column("chunk").to_pylist())
        for c in sorted(set(range(g.num_chunks)) - seen):
            report.problems.append(f"teacher {name!r} chunk {c}: no checksum recorded (chunk missing)")
    report.teachers_checked.append(name)


def verify_cache(url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 progress: bool = True) -> VerifyReport:
    """Check completeness, per-chunk checksums and fingerprints of a cache.

    Returns:
        A `VerifyReport`; `report.ok` is False and `report.problems` names each bad chunk.

    Raises:
        CacheNotFoundError / CacheFormatError: no readable manifest (nothing else can be checked).
    """
    store = CacheStore(url, storage_options)
    reader = CacheReader(store)
    report = VerifyReport(url=str(url))
    names = sorted(set(reader.store.subdirs("teachers")) | set(reader.manifest.teachers))
    with tqdm(desc="verify", unit=" chunks", disable=not progress) as bar:
        _check_inputs(reader, report, bar)
        for name in names:
            _check_teacher(reader, name, report, bar)
    return report
