"""`run_teacher`: run one teacher over a cache's inputs and store its soft labels.

Order of work: load and check the teacher (nothing is written before every check passed), take
the teacher's lock (one run per teacher at a time), claim the teacher group (resume when the
stored settings are these; `--overwrite` replaces it only when they differ), then compute the
uncommitted chunks (`chunk.run_chunk`) while a writer thread encodes, compresses and commits the
previous one. Under torchrun rank 0 broadcasts the uncommitted list and each rank takes every
W-th chunk of it (`distributed`). Samples with non-finite logits do not stop the run: every
chunk that is fine is committed, then one error names every bad sample.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from mtkd_cache.errors import (
    CacheFormatError,
    CacheNotFoundError,
    NonFiniteLogitsError,
    write_error,
)
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.overlay import reader_for_run
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter
from mtkd_cache.precompute.chunk import ChunkOutput, cpu_reducers, run_chunk
from mtkd_cache.precompute.config import RunConfig, canonical_kwargs
from mtkd_cache.precompute.cross import reader_for
from mtkd_cache.precompute.device import gpu_group, group_max_memory, resolve_device, resolve_dtype
from mtkd_cache.precompute.distributed import (
    DistInfo,
    all_gather,
    barrier,
    broadcast,
    dist_info,
    share_of,
    shutdown,
)
from mtkd_cache.precompute.encoder import run_feature_chunk
from mtkd_cache.precompute.extract import NONFINITE_FIX
from mtkd_cache.precompute.lock import TeacherLock, check_shared_store
from mtkd_cache.precompute.models import LoadedTeacher, load_teacher
from mtkd_cache.precompute.setup import setup_teacher

__all__ = ["RunConfig", "run_teacher"]

log = logging.getLogger(__name__)


def run_teacher(cache: str | os.PathLike[str], cfg: RunConfig, *, storage_options: Mapping[str, Any] | None = None,
                factory_kwargs: Mapping[str, Any] | None = None, progress: bool = True,
                inputs: str | None = None, own_tokenization: bool | None = None) -> TeacherMeta:
    """Run one teacher over the cache's inputs and store its targets (resumable, shardable).

    Args:
        cache: Cache path or fsspec URL, already `prepare`d.
        cfg: What to compute and how (see `RunConfig`).
        factory_kwargs: Keyword arguments for a `package.module:function` model factory; JSON
            values, stored with the teacher's settings and compared on resume.
        inputs: URL of a cache to read the inputs from (one you may not write): `cache` is then an
            overlay that stores only this teacher (format/overlay.py).
        own_tokenization: Run on the teacher's own tokenization of the stored text. None (default):
            exactly when its tokenizer differs from the inputs' (docs/CROSS_TOKENIZER.md).

    Returns:
        The teacher's metadata as written to `teacher.json`.

    Raises:
        TeacherLoadError: unknown model. CacheMismatchError: tokenizer/vocabulary mismatch.
        CacheExistsError: the teacher exists with other settings and `overwrite` is off.
        TeacherBusyError: another run is computing this teacher now.
        NonFiniteLogitsError: NaN/inf logits; names every bad sample id (the other chunks are kept).
        CacheWriteError: the disk is full or the cache cannot be written (names the file).
    """
    store = CacheStore(cache, storage_options)
    reader = reader_for_run(store, inputs)
    _ = reader._columns  # read and check the sample table before anything is written
    device, max_memory = _place(cfg)
    info = dist_info(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if info.rank == 0 and (cfg.device == "auto" or cfg.dtype == "auto"):
        log.info("teacher %r runs on %s%s in %s (--device %s, --dtype %s)", cfg.teacher, device,
                 f" with --device-map {cfg.device_map}" if cfg.device_map else "", dtype, cfg.device, cfg.dtype)
    try:
        load = functools.partial(load_teacher, device_map=cfg.device_map, max_memory=max_memory)
        teacher, meta, pad_id = setup_teacher(reader, cfg, canonical_kwargs(factory_kwargs), device, dtype, load,
                                              own_tokenization)
        reader = reader_for(reader, meta)  # a teacher with another tokenizer runs on its own grid
        if info.rank == 0:
            _warn_small_chunks(reader, cfg)
        with _rank0_lock(store, cfg.teacher, info) as lock:
            writer = _open_writer(store, reader, meta, cfg, info)
            if writer.already_complete:
                barrier(info)
                return TeacherMeta.from_dict(store.read_json(f"teachers/{cfg.teacher}/teacher.json"))
            todo = broadcast(info, sorted(set(range(reader.num_chunks)) - writer.committed()) if info.rank == 0 else None)
            bad = _process(reader, teacher, meta, writer, cfg, share_of(todo or [], info), device, dtype, pad_id,
                           progress and info.rank == 0, lock)
            bad = sorted(i for ids in all_gather(info, bad) for i in ids)
            if bad:
                raise _nonfinite_error(cfg, bad, reader.num_chunks, writer)
            barrier(info)
            result = writer.finish() if info.rank == 0 else meta
            barrier(info)
            return result
    except OSError as e:  # a full disk anywhere (lock, claim, arrays, finish): one line, not a traceback
        err = write_error(e, store.url, f"running teacher {cfg.teacher!r}")
        if err is e:
            raise
        raise err from e
    finally:
        shutdown(info)


def _warn_small_chunks(reader: CacheReader, cfg: RunConfig) -> None:
    """Batches never span chunks (a resume must batch exactly as the first run did), so a chunk
    smaller than the batch budget caps the batch: say so, with the `prepare` setting that scales
    the chunk to the budget."""
    grid, length = reader.inputs.grid, max(1, reader.inputs.max_length or 1)
    want = cfg.batch_size if cfg.max_tokens is None else min(cfg.batch_size, max(1, cfg.max_tokens // length))
    if grid.chunk_samples < want and grid.num_chunks > 1:
        log.warning("teacher %r: batches stop at chunk boundaries and a chunk holds %d samples (%d positions), fewer "
                    "than --batch-size %d / --max-tokens %s allow; prepare the cache with --chunk-samples %d to fill "
                    "batches", cfg.teacher, grid.chunk_samples, grid.chunk_positions, cfg.batch_size,
                    cfg.max_tokens, want)


def _place(cfg: RunConfig) -> tuple[torch.device, dict[int | str, int | str] | None]:
    """This rank's (first) device and, with `--device-map`, the memory budget confining it to its GPUs.

    Under torchrun a rank owns `cuda:LOCAL_RANK`, or with `--device-map` an equal block of the
    node's GPUs (`gpu_group`), so ranks never share a GPU.
    """
    device = resolve_device(cfg.device)
    max_memory = dict(cfg.max_memory) if cfg.max_memory else None
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, max_memory
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device_map is None:
        return torch.device("cuda", local), None
    group = gpu_group(local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    return torch.device("cuda", group[0]), max_memory or group_max_memory(group)


@contextmanager
def _rank0_lock(store: CacheStore, teacher: str, info: DistInfo) -> Iterator[TeacherLock | None]:
    """Rank 0 holds the teacher's lock for the whole job; the other ranks wait until it has it and
    check that they see it (one store shared by every node)."""
    if info.rank != 0:
        barrier(info)
        check_shared_store(store, teacher, broadcast(info, ""), info.rank)
        yield None
        return
    with TeacherLock(store, teacher) as lock:
        barrier(info)
        broadcast(info, str(lock.record["token"]))
        yield lock


def _stored_settings(store: CacheStore, name: str) -> dict[str, Any] | None:
    """The settings the teacher group was (or is being) computed with; None if none or unreadable."""
    try:
        if store.exists(f"teachers/{name}/teacher.json"):
            return TeacherMeta.from_dict(store.read_json(f"teachers/{name}/teacher.json")).settings()
        if store.exists(f"teachers/{name}/_run.json"):
            return store.read_json(f"teachers/{name}/_run.json")
    except (CacheFormatError, CacheNotFoundError):
        return None
    return None


def _open_writer(store: CacheStore, reader: CacheReader, meta: TeacherMeta, cfg: RunConfig,
                 info: DistInfo) -> TeacherWriter:
    """Claim the teacher group on rank 0 (then open it on the others).

    `--overwrite` wipes the group only when its stored settings differ from these: a rerun with
    the same settings resumes (or finds the teacher complete) and never loses finished chunks.
    """
    if info.rank == 0:
        store.check_writable()
        overwrite = cfg.overwrite and _stored_settings(store, meta.name) != meta.settings()
        writer = TeacherWriter(store, meta, reader.inputs, overwrite=overwrite, create=True)
    barrier(info)
    if info.rank != 0:
        writer = TeacherWriter(store, meta, reader.inputs, create=False)
        writer.already_complete = store.exists(f"teachers/{cfg.teacher}/teacher.json")
    return writer


def _nonfinite_error(cfg: RunConfig, bad: Sequence[int], num_chunks: int, writer: TeacherWriter) -> NonFiniteLogitsError:
    shown = ", ".join(map(str, bad[:100])) + (f", ... ({len(bad) - 100} more)" if len(bad) > 100 else "")
    done = len(writer.committed())
    err = NonFiniteLogitsError(
        f"teacher {cfg.teacher!r} produced NaN/inf logits for {len(bad)} sample(s), ids [{shown}]; "
        f"{done} of {num_chunks} chunks are committed and kept (the chunks holding these samples are not); "
        f"{NONFINITE_FIX}")
    err.sample_ids = list(bad)  # type: ignore[attr-defined]
    return err


def _process(reader: CacheReader, teacher: LoadedTeacher, meta: TeacherMeta, writer: TeacherWriter,
             cfg: RunConfig, pending: Sequence[int], device: torch.device, dtype: torch.dtype, pad_id: int,
             progress: bool, lock: TeacherLock | None) -> list[int]:
    """Compute and commit `pending`; return the ids of samples with non-finite logits."""
    g = reader.inputs.grid
    total = sum(int(reader._columns["num_positions"][slice(*g.sample_range(c))].sum()) for c in pending)
    bar = tqdm(total=total, desc=f"run {cfg.teacher}", unit=" pos", unit_scale=True, disable=not progress)
    in_flight: list[Future[None]] = []
    bad: list[int] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtkd-writer") as pool, cpu_reducers(device) as reducers, \
            contextlib.closing(bar):  # the bar ends its line before any error message
        for c in pending:
            run = run_feature_chunk if meta.target.kind == "none" else run_chunk  # a teacher without a head
            out = run(reader.read_chunk(c), teacher, meta, c, seed=cfg.seed, batch_size=cfg.batch_size,
                      max_tokens=cfg.max_tokens, device=device, dtype=dtype, pad_id=pad_id, reducers=reducers,
                      on_batch=bar.update)  # the bar moves per batch: a chunk can take minutes
            while in_flight:  # keep one chunk compressing while the next one computes
                in_flight.pop(0).result()
            if out.nonfinite:
                bad.extend(out.nonfinite)
                continue
            in_flight.append(pool.submit(_commit, writer, c, out, lock))
        for f in in_flight:
            f.result()
    return bad


def _commit(writer: TeacherWriter, chunk: int, out: ChunkOutput, lock: TeacherLock | None) -> None:
    _guard_write(lambda: writer.write_chunk(chunk, **out.arrays, features=out.features, stats=out.stats),
                 writer.store, f"writing chunk {chunk} of teacher {writer.meta.name!r}")
    if lock is not None:
        lock.beat()


def _guard_write(write: Any, store: CacheStore, what: str) -> Any:
    """Run `write`; a full disk or another OS error becomes a one-line `CacheWriteError`."""
    try:
        return write()
    except OSError as e:
        raise write_error(e, store.url, what) from e
