"""Job arrays: `run --shard I/N` computes the I-th of N contiguous chunk ranges; `finalize` completes.

Each shard is an independent process (a Slurm array task, a Kubernetes indexed job): no torchrun,
no rendezvous. A shard claims the teacher group under the teacher's lock (waiting a bounded time
while another shard is claiming it; the claim is idempotent for equal settings), then releases it
and holds its own lock `teachers/<name>.shard-I-of-N.lock` while it computes and commits its
uncommitted chunks. A shard that fails is simply rerun: committed chunks are kept. When all chunks
are committed, `finalize` (under the teacher's lock) checks every commit marker and writes
`chunks.parquet` and then `teacher.json`, exactly as a single run's finish does, so the stored
arrays and checksums are bit-identical to a single run's.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mtkd_cache.errors import TeacherBusyError, write_error
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.overlay import reader_for_run
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter
from mtkd_cache.precompute.config import RunConfig, canonical_kwargs
from mtkd_cache.precompute.device import resolve_dtype
from mtkd_cache.precompute.distributed import dist_info
from mtkd_cache.precompute.lock import TeacherLock
from mtkd_cache.precompute.models import load_teacher
from mtkd_cache.precompute.run import _nonfinite_error, _open_writer, _place, _process
from mtkd_cache.precompute.setup import setup_teacher

__all__ = ["ShardReport", "finalize_teacher", "parse_shard", "run_shard"]

CLAIM_WAIT = 120.0


@dataclass
class ShardReport:
    """What one shard did: its chunks, and how many chunks of the teacher are still uncommitted."""

    shard: tuple[int, int]
    chunks: list[int]
    remaining: int
    complete: bool = False


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; a ValueError names the value and the expected form."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/8 (shard I of N, counted from 0)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I must be in [0, N), e.g. 0/{max(n, 1)} .. {max(n, 1) - 1}/{max(n, 1)}")
    return i, n


def _locked(store: CacheStore, name: str, wait: float = CLAIM_WAIT) -> TeacherLock:
    """Take lock `name`, waiting (bounded) while other shards hold it for their short claim."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return TeacherLock(store, name).__enter__()
        except TeacherBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_shard(cache: str | os.PathLike[str], cfg: RunConfig, shard: tuple[int, int], *,
              storage_options: Mapping[str, Any] | None = None, factory_kwargs: Mapping[str, Any] | None = None,
              progress: bool = True, inputs: str | None = None) -> ShardReport:
    """Compute and commit the uncommitted chunks of shard `shard` = (I, N) of teacher `cfg.teacher`.

    Raises:
        ValueError: under torchrun (one process per shard). Otherwise as `run_teacher`.
    """
    store = CacheStore(cache, storage_options)
    reader = reader_for_run(store, inputs)
    device, max_memory = _place(cfg)
    info = dist_info(device)
    if info.world_size > 1:
        raise ValueError("--shard runs one process per shard; start it without torchrun")
    load = functools.partial(load_teacher, device_map=cfg.device_map, max_memory=max_memory)
    dtype = resolve_dtype(cfg.dtype, device)
    teacher, meta, pad_id = setup_teacher(reader, cfg, canonical_kwargs(factory_kwargs), device, dtype, load)
    try:
        claim = _locked(store, cfg.teacher)
        try:
            writer = _open_writer(store, reader, meta, cfg, info)
        finally:
            claim.__exit__(None, None, None)
        if writer.already_complete:
            return ShardReport(shard, [], 0, complete=True)
        todo = writer.pending(*shard)
        with TeacherLock(store, f"{cfg.teacher}.shard-{shard[0]}-of-{shard[1]}") as lock:
            bad = _process(reader, teacher, meta, writer, cfg, todo, device, dtype, pad_id, progress, lock)
        if bad:
            raise _nonfinite_error(cfg, bad, reader.num_chunks, writer)
        return ShardReport(shard, todo, reader.num_chunks - len(writer.committed()))
    except OSError as e:
        err = write_error(e, store.url, f"running shard {shard[0]}/{shard[1]} of teacher {cfg.teacher!r}")
        if err is e:
            raise
        raise err from e


def finalize_teacher(cache: str | os.PathLike[str], teacher: str, *,
                     storage_options: Mapping[str, Any] | None = None) -> TeacherMeta:
    """Complete a teacher computed by shards: check every chunk is committed, write teacher.json.

    Raises:
        CacheIncompleteError: chunks are missing (names them: rerun their shards).
        CacheNotFoundError: no run of `teacher` was started in `cache`.
    """
    store = CacheStore(cache, storage_options)
    reader: CacheReader = reader_for_run(store, None)
    if store.exists(f"teachers/{teacher}/teacher.json"):
        return reader.teacher(teacher).meta
    meta = TeacherMeta.from_dict(store.read_json(f"teachers/{teacher}/_run.json"))
    lock = _locked(store, teacher)
    try:
        return TeacherWriter(store, meta, reader.inputs, create=False).finish()
    finally:
        lock.__exit__(None, None, None)
