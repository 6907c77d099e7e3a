"""`verify_cache`: check a cache is complete and that every stored chunk is what was written.

For the inputs and each teacher it re-reads every chunk region of every array (an absent shard
or a crc32c mismatch is reported, never read as zeros), recomputes the blake2b content checksums
recorded at write time, runs the read-time value checks (ids in range and ascending, ...),
checks each `teacher.json` against the hash its `chunks.parquet` recorded, re-hashes every
sample and recomputes the dataset fingerprint. Each tokenization of the stored text (cross-tokenizer
teachers) is checked as fully (ops/verify_tokenization.py), and a teacher on a tokenization has its
values checked on that tokenization's rows. Cost: one full read of the cache.

With `repair=True` a damaged teacher chunk loses its commit marker, and a teacher with any
damage loses `teacher.json` and `chunks.parquet` (it becomes incomplete), so the next
`mtkd-cache run` of that teacher, with its own settings, recomputes only those chunks. Damaged
inputs cannot be repaired in place (every teacher depends on them): the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtkd_cache.errors import CacheCorruptError, CacheFormatError, CacheNotFoundError
from mtkd_cache.format.checks import check_teacher_json, inputs_fix, read_rows, teacher_fix
from mtkd_cache.format.codecs import array_checksum
from mtkd_cache.format.fingerprint import (
    DatasetHasher,
    sample_content,
    sample_hash,
    token_sample_content,
)
from mtkd_cache.format.kinds import teacher_arrays
from mtkd_cache.format.layout import ChunkGrid, chunk_rows, shard_key
from mtkd_cache.format.loss_mask import LOSS_MASK
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.overlay import is_overlay, open_overlay
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import marker_key
from mtkd_cache.ops.verify_tokenization import check_cross_values, check_tokenizations

__all__ = ["VerifyReport", "verify_cache"]


@dataclass
class VerifyReport:
    """What `verify_cache` found. `ok` is True only when `problems` is empty.

    `damaged` maps a teacher to its damaged chunks; `repaired` lists what `repair=True` removed.
    """

    url: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    teachers_checked: list[str] = field(default_factory=list)
    damaged: dict[str, list[int]] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "problems": self.problems,
                "chunks_checked": self.chunks_checked, "teachers_checked": self.teachers_checked,
                "damaged": self.damaged, "repaired": self.repaired}


Region = Callable[[int, str], tuple[int, int, str]]


def _check_arrays(reader: CacheReader, group_key: str, region: Region, report: VerifyReport,
                  what: str, fix: str, bar: Any, store: CacheStore | None = None,
                  grid: ChunkGrid | None = None) -> set[int] | None:
    """Checksum every recorded (chunk, array) region of `store` (default: the reader's) on `grid`
    (default: the inputs'); returns the damaged chunks (None: no table)."""
    store = store or reader.store
    table_key = f"{group_key}/chunks.parquet"
    try:
        rows = store.read_table(table_key).to_pylist()
    except (CacheNotFoundError, OSError) as e:
        report.problems.append(f"{what}: checksum table {store.path(table_key)} is missing or unreadable "
                               f"({type(e).__name__}); {fix}")
        return None
    group = store.open_group(group_key, mode="r")
    damaged: set[int] = set()
    for row in rows:
        c, name = int(row["chunk"]), str(row["array"])
        r0, r1, on = region(c, name)
        ndim = 2
        try:
            arr: Any = group[name]
            ndim = len(arr.shape)
            block = read_rows(store, arr, owner=what, group_key=group_key, name=name, start=r0, stop=r1,
                              grid=grid or reader.inputs.grid, on=on, fix=fix)
            ok = array_checksum(np.asarray(block)) == row["checksum"]
            problem = "checksum mismatch: the decoded data differs from what was written"
        except (CacheCorruptError, KeyError) as e:
            ok, problem = False, str(e).split("): ", 1)[-1].split("; ")[0]
        if not ok:
            file = store.path(shard_key(f"{group_key}/{name}", c, ndim))
            report.problems.append(f"{what} chunk {c} array {name!r}: {problem} ({file}); {fix}")
            damaged.add(c)
        report.chunks_checked += 1
        bar.update(1)
    return damaged


def _check_inputs(reader: CacheReader, report: VerifyReport, bar: Any) -> None:
    inputs, g = reader.inputs, reader.inputs.grid

    def region(c: int, name: str) -> tuple[int, int, str]:
        on = "token" if name in ("token_ids", "byte_ends", LOSS_MASK) else "sample"
        return (*chunk_rows(g, c, on), on)

    damaged = _check_arrays(reader, "inputs", region, report, "inputs", inputs_fix(reader.url), bar)
    if damaged or damaged is None:
        return  # sample hashes would only repeat the damage
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
                span = slice(data.offsets[j], data.offsets[j] + data.lengths[j])
                mask = data.inputs[LOSS_MASK][span] if LOSS_MASK in data.inputs else None
                content = token_sample_content(data.inputs["token_ids"][span], mask, labels[sid], domains[sid])
            else:
                content = sample_content([data.inputs[k][j] for k in sorted(data.inputs)], labels[sid], domains[sid])
            h = sample_hash(content)
            recomputed.append(h)
            if h != hashes[sid]:
                report.problems.append(f"inputs chunk {c} sample {int(sid)}: content hash mismatch; {inputs_fix(reader.url)}")
    settings = inputs.source.get("fingerprint_settings")
    if settings is None:
        report.problems.append("inputs: fingerprint settings are not recorded; cannot recompute the fingerprint")
        return
    hasher = DatasetHasher(settings)
    hasher.update(recomputed)
    if hasher.hexdigest() != inputs.dataset_fingerprint:
        report.problems.append(f"inputs: dataset fingerprint recomputes to {hasher.hexdigest()}, recorded "
                               f"{inputs.dataset_fingerprint}")


def _teacher_meta(reader: CacheReader, name: str, report: VerifyReport) -> TeacherMeta | None:
    """The teacher's metadata if teacher.json is present and trustworthy; else records the problem."""
    store, key = reader.teacher_store(name), f"teachers/{name}"
    if not store.exists(f"{key}/teacher.json"):
        report.problems.append(f"teacher {name!r} is incomplete (no teacher.json); re-run `mtkd-cache run` with "
                               f"the same arguments to finish it")
        return None
    try:
        raw = store.read_json(f"{key}/teacher.json")
        check_teacher_json(store, name, raw)
        meta = TeacherMeta.from_dict(raw)
    except (CacheCorruptError, CacheFormatError) as e:
        report.problems.append(f"teacher {name!r}: {e}")
        report.damaged.setdefault(name, [])
        return None
    if meta.dataset_fingerprint != reader.inputs.dataset_fingerprint:
        report.problems.append(f"teacher {name!r}: dataset fingerprint {meta.dataset_fingerprint} != inputs "
                               f"{reader.inputs.dataset_fingerprint}; re-run it with `mtkd-cache run --overwrite`")
        return None
    return meta


def _check_teacher(reader: CacheReader, name: str, report: VerifyReport, bar: Any,
                   tokenizations: Mapping[str, bool]) -> None:
    meta = _teacher_meta(reader, name, report)
    if meta is None:
        return
    if meta.tokenization is not None and not tokenizations.get(meta.tokenization, False):
        report.problems.append(f"teacher {name!r} runs on tokenization {meta.tokenization!r}, which is missing or "
                               f"damaged (see above); re-run it after that tokenization is rebuilt")
        return  # not for --repair: its own chunks are not what is damaged
    g, key, fix = reader.teacher(name).inputs.grid, f"teachers/{name}", teacher_fix(reader.url, name)  # own grid
    grids = {a.key: a.grid for a in teacher_arrays(meta)}

    def region(c: int, arr: str) -> tuple[int, int, str]:
        on = grids.get(arr, meta.grid)
        return (*chunk_rows(g, c, on), on)

    store = reader.teacher_store(name)  # an overlay's own teachers live in the overlay
    damaged = _check_arrays(reader, key, region, report, f"teacher {name!r}", fix, bar, store, g)
    if damaged is None:
        report.damaged.setdefault(name, [])
        return
    for c in sorted(set(range(g.num_chunks)) - damaged):
        try:  # the value checks the reader runs (ids in range and ascending, sane values), on the teacher's grid
            if meta.tokenization is None:
                reader.read_chunk(c, teachers=[name], features={name: [f.layer for f in meta.features]})
            else:
                check_cross_values(reader, name, meta, c)
        except CacheCorruptError as e:
            report.problems.append(str(e))
            damaged.add(c)
    recorded = {int(c) for c in store.read_table(f"{key}/chunks.parquet", columns=["chunk"]).column(0).to_pylist()}
    for c in sorted(set(range(g.num_chunks)) - recorded):
        report.problems.append(f"teacher {name!r} chunk {c}: no checksum recorded (chunk missing); {fix}")
        damaged.add(c)
    if damaged:
        report.damaged[name] = sorted(damaged)
    report.teachers_checked.append(name)


def _repair(store: CacheStore, report: VerifyReport) -> None:
    """Drop the commit markers of damaged chunks and the completeness record of damaged teachers."""
    for name, chunks in sorted(report.damaged.items()):
        for c in chunks:
            if store.exists(marker_key(name, c)):
                store.remove(marker_key(name, c))
                report.repaired.append(marker_key(name, c))
        for key in (f"teachers/{name}/teacher.json", f"teachers/{name}/chunks.parquet"):
            if store.exists(key):
                store.remove(key)
                report.repaired.append(key)


def verify_cache(url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 progress: bool = True, repair: bool = False) -> VerifyReport:
    """Check completeness, per-chunk checksums, value sanity and fingerprints of a cache.

    Args:
        url: Cache path or fsspec URL.
        storage_options: Passed to fsspec.
        progress: Show a progress bar.
        repair: Remove the commit markers of damaged teacher chunks and the `teacher.json` of
            damaged teachers, so that `mtkd-cache run` recomputes only those chunks.

    Returns:
        A `VerifyReport`; `report.ok` is False and `report.problems` names each bad chunk, array and file.

    Raises:
        CacheNotFoundError / CacheFormatError: no readable manifest (nothing else can be checked).
        CacheMismatchError: an overlay whose base no longer holds the inputs it was made for.
    """
    store = CacheStore(url, storage_options)
    # An overlay (format/overlay.py): its base's inputs are checked (read only) and its own teachers.
    reader = open_overlay(store) if is_overlay(store) else CacheReader(store)
    report = VerifyReport(url=str(url))
    with tqdm(desc="verify", unit=" chunks", disable=not progress) as bar:
        _check_inputs(reader, report, bar)
        tokenizations = check_tokenizations(reader, report.problems)
        for name in store.subdirs("teachers"):
            _check_teacher(reader, name, report, bar, tokenizations)
    if repair:
        _repair(store, report)
    return report
