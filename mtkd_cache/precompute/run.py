"""`run_teacher`: run one teacher over a cache's inputs and store its soft labels.

Per chunk: read the chunk's samples, group them by length into batches, run the teacher (under
autocast on GPU), and reduce each batch's logits on the device to the compressed targets (top-k
log-probabilities + exact tail, or sampled tokens + counts) and the asked-for features; only
those cross to the host. A writer thread encodes, compresses and commits the previous chunk
while the next one runs. Cost: one teacher forward per position plus O(V) reductions per row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtkd_cache._version import __version__
from mtkd_cache.errors import CacheMismatchError
from mtkd_cache.format.codecs import index_dtype_for
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.format.meta import Compressor, FeatureSpec, TargetSpec, TeacherMeta, ValueEncoding
from mtkd_cache.format.reader import CacheReader, ChunkData
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter
from mtkd_cache.precompute.batching import length_grouped_batches, pad_batch
from mtkd_cache.precompute.device import autocast_context, resolve_device, resolve_dtype
from mtkd_cache.precompute.distributed import barrier, dist_info, shutdown
from mtkd_cache.precompute.extract import (
    NonFiniteLogitsError,
    check_finite,
    distribution_stats,
    pool_features,
    sample_targets,
    topk_targets_with_stats,
)
from mtkd_cache.precompute.models import LoadedTeacher, forward_teacher, load_teacher

__all__ = ["RunConfig", "run_teacher"]


@dataclass(frozen=True)
class RunConfig:
    """Settings of one `run_teacher` call (the CLI flags of `mtkd-cache run`)."""

    teacher: str
    """Name of the teacher group in the cache (`--teacher`)."""
    model: str
    """HF model folder or id, or a `package.module:function` factory (`--model`)."""
    top_k: int | None = 64
    """Keep the k most likely tokens per position plus the exact tail mass (`--top-k`)."""
    samples: int | None = None
    """Instead of top-k, draw this many tokens per position and store counts (`--samples`)."""
    features: tuple[int, ...] = ()
    """Hidden-state layers to store (`--features`, HF indices: 0 = embeddings, -1 = last)."""
    pool: str = "none"
    """`none` keeps features per position, `mean` pools them per sample (`--pool`)."""
    feature_dtype: str = "float16"
    """`float16` or `int8` (per-row scale) for stored features (`--feature-dtype`)."""
    temperature: float = 1.0
    """Capture temperature of the stored distribution (`--temperature`)."""
    value_codec: str = "u8log"
    """`u8log` (8-bit log-prob code), `fp16` or `fp32` (`--values`)."""
    logp_step: float = 1.0 / 16.0
    """Grid step in nats of the `u8log` code (`--logp-step`)."""
    tail_dtype: str = "float16"
    """Storage type of the tail mass (`--tail-dtype`)."""
    compression: str = "zstd"
    """`zstd` or `blosc` (`--compression`)."""
    compression_level: int = 3
    """Compression level (`--compression-level`)."""
    batch_size: int = 8
    """Samples per forward pass (`--batch-size`)."""
    max_tokens: int | None = None
    """Optional budget of padded tokens per batch (`--max-tokens`)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N` (`--device`)."""
    dtype: str = "auto"
    """`auto`, `bf16`, `fp16` or `fp32` (`--dtype`)."""
    seed: int = 0
    """Seed of sampled targets; draws depend only on (seed, chunk) (`--seed`)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (`--trust-remote-code`)."""
    overwrite: bool = False
    """Replace a teacher group stored with other settings (`--overwrite`)."""

    def __post_init__(self) -> None:
        if (self.top_k is None) == (self.samples is None):
            raise ValueError("give exactly one of --top-k K or --samples N")
        if self.pool not in ("none", "mean"):
            raise ValueError(f"--pool must be 'none' or 'mean', got {self.pool!r}")
        if self.feature_dtype not in ("float16", "int8"):
            raise ValueError(f"--feature-dtype must be 'float16' or 'int8', got {self.feature_dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.teacher or "/" in self.teacher or self.teacher.startswith((".", "_")):
            raise ValueError(f"--teacher {self.teacher!r}: use a plain name such as 'qwen7b' (no '/', no leading '.' or '_')")

    @property
    def target(self) -> TargetSpec:
        if self.top_k is not None:
            return TargetSpec("topk", k=self.top_k, temperature=self.temperature, seed=self.seed)
        return TargetSpec("sample", draws=self.samples, temperature=self.temperature, seed=self.seed)


def _check_vocab(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig) -> None:
    inputs = reader.inputs
    if inputs.tokenizer is not None and teacher.task in ("causal_lm", "sequence_classification"):
        if teacher.tokenizer_path is not None:
            from mtkd_cache.precompute.prepare import load_tokenizer

            fp = tokenizer_fingerprint(load_tokenizer(teacher.tokenizer_path, cfg.trust_remote_code))
            if fp != inputs.tokenizer.fingerprint:
                raise CacheMismatchError(
                    f"teacher {cfg.teacher!r} ({cfg.model}) has tokenizer fingerprint {fp}, but the cache's "
                    f"inputs were tokenized with {inputs.tokenizer.name_or_path!r} ({inputs.tokenizer.fingerprint}); "
                    f"use a teacher that shares the tokenizer, or prepare a new cache with its tokenizer")
        if teacher.task == "causal_lm" and teacher.padded_vocab_size < inputs.tokenizer.vocab_size:
            raise CacheMismatchError(
                f"teacher {cfg.teacher!r} has {teacher.padded_vocab_size} output tokens but the cache's "
                f"tokenizer has {inputs.tokenizer.vocab_size}; the teacher cannot score these inputs")
    if cfg.top_k is not None and cfg.top_k > teacher.vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} is larger than teacher {cfg.teacher!r}'s vocabulary of "
                         f"{teacher.vocab_size}; use --top-k <= {teacher.vocab_size}")


def _batch_inputs(data: ChunkData, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    if "token_ids" in data.inputs:
        toks = data.inputs["token_ids"]
        seqs = [toks[data.offsets[i] : data.offsets[i] + data.lengths[i]] for i in idx]
        return pad_batch(seqs, pad_id)
    return {k: torch.from_numpy(np.ascontiguousarray(v[list(idx)])) for k, v in data.inputs.items()}


def _probe(reader: CacheReader, teacher: LoadedTeacher, layers: Sequence[int], pad_id: int
           ) -> tuple[dict[int, int], bool]:
    """One forward on the first sample: feature widths, and whether the logits are per token."""
    if not layers and teacher.task != "custom":  # known without a forward (a full sample's worth of compute)
        return {}, reader.inputs.kind == "tokens" and teacher.task == "causal_lm"
    data = reader.read_chunk(0)
    logits, hidden = forward_teacher(teacher, _batch_inputs(data, [0], pad_id), want_hidden=bool(layers))
    per_token = reader.inputs.kind == "tokens" and (
        teacher.task == "causal_lm" or (teacher.task == "custom" and int(logits.shape[1]) == int(data.lengths[0]) > 1))
    dims = {layer: int(hidden[layer].shape[-1]) for layer in layers} if hidden is not None else {}
    return dims, per_token


def _teacher_meta(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, dtype: torch.dtype,
                  dims: Mapping[int, int], per_token: bool) -> TeacherMeta:
    grid = "token" if per_token else "sample"
    feats = tuple(FeatureSpec(layer=layer, pool=cfg.pool if grid == "token" else "mean",  # type: ignore[arg-type]
                              dtype=cfg.feature_dtype, dim=dims[layer]) for layer in cfg.features)  # type: ignore[arg-type]
    tok = reader.inputs.tokenizer
    return TeacherMeta(
        name=cfg.teacher, model=cfg.model, task=teacher.task, weights_hash=teacher.weights_hash,
        dtype=str(dtype).removeprefix("torch."), vocab_size=teacher.vocab_size,
        padded_vocab_size=teacher.padded_vocab_size, grid=grid, target=cfg.target,  # type: ignore[arg-type]
        values=ValueEncoding(cfg.value_codec, cfg.logp_step),  # type: ignore[arg-type]
        index_dtype=index_dtype_for(teacher.vocab_size), tail_dtype=cfg.tail_dtype,
        compressor=Compressor(cfg.compression, cfg.compression_level),  # type: ignore[arg-type]
        dataset_fingerprint=reader.inputs.dataset_fingerprint,
        tokenizer_fingerprint=None if tok is None else tok.fingerprint,
        features=feats, revision=teacher.revision, mtkd_version=__version__,
    )


@dataclass(frozen=True)
class _Reducers:
    """Single-threaded CPU workers for the per-batch reductions (see `_reduce_batch`)."""

    pool: ThreadPoolExecutor
    workers: int


def _reduce(logits: torch.Tensor, sample_ids: list[int], rows_mask: torch.Tensor | None,
            spec: TargetSpec, vocab_size: int) -> list[torch.Tensor]:
    """Finiteness check, then [indices, logp, tail] (top-k only) + [entropy, top1] of a batch."""
    check_finite(logits, sample_ids, mask=rows_mask)
    if spec.kind != "topk":
        return list(distribution_stats(logits, spec.temperature, vocab_size))  # (B, T) each
    return list(topk_targets_with_stats(logits, spec.k, spec.temperature, vocab_size))  # type: ignore[arg-type]


def _reduce_batch(reducers: _Reducers | None, logits: torch.Tensor, sample_ids: list[int],
                  rows_mask: torch.Tensor | None, spec: TargetSpec, vocab_size: int) -> list[torch.Tensor]:
    """`_reduce` on the device, or on the CPU split by samples over the single-threaded `reducers`.

    The O(V) reductions are many short passes over cache-sized row blocks. Under torch's
    intra-op threads each pass is a parallel region whose barrier waits for every thread, and on
    a shared CPU a descheduled thread stalls each of the ~10^3 barriers per batch (5x slower than
    one thread at load 6 on 2 cores; benchmarks/precompute_overhead.py). Slices of the batch on
    workers with one intra-op thread each never wait for one another.
    """
    if reducers is None:
        return _reduce(logits, sample_ids, rows_mask, spec, vocab_size)
    parts = np.array_split(np.arange(logits.shape[0]), min(reducers.workers, logits.shape[0]))
    futures = [reducers.pool.submit(_reduce, logits[p[0]: p[-1] + 1], sample_ids[p[0]: p[-1] + 1],
                                    None if rows_mask is None else rows_mask[p[0]: p[-1] + 1], spec, vocab_size)
               for p in parts]
    try:
        results = [f.result() for f in futures]
    except NonFiniteLogitsError:
        check_finite(logits, sample_ids, mask=rows_mask)  # name every bad sample, not one slice's
        raise
    return [torch.cat(pieces) for pieces in zip(*results)]


@contextlib.contextmanager
def _cpu_reducers(device: torch.device) -> Iterator[_Reducers | None]:
    """One single-threaded reduction worker per intra-op thread on the CPU; None elsewhere."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        yield None
        return
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="mtkd-reduce", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            yield _Reducers(pool, threads)
    finally:
        torch.set_num_threads(threads)  # the workers' setting also lowered the default of new threads


def _run_chunk(reader: CacheReader, teacher: LoadedTeacher, meta: TeacherMeta, cfg: RunConfig,
               chunk: int, device: torch.device, dtype: torch.dtype, pad_id: int,
               reducers: _Reducers | None = None) -> dict[str, Any]:
    """Forward every sample of `chunk`; return host arrays in sample order plus stats."""
    data = reader.read_chunk(chunk)
    n = len(data.sample_ids)
    lengths = data.lengths.tolist() if "token_ids" in data.inputs else [1] * n
    per_sample: list[dict[str, Any]] = [{} for _ in range(n)]
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + chunk)
    stats = {"positions": 0.0, "tail_sum": 0.0, "entropy_sum": 0.0, "top1_prob_sum": 0.0}
    spec = meta.target
    if spec.kind != "topk":
        del stats["tail_sum"]
    for idx in length_grouped_batches(lengths, cfg.max_tokens, cfg.batch_size):
        batch = _batch_inputs(data, idx, pad_id)
        with autocast_context(device, dtype):
            logits, hidden = forward_teacher(teacher, batch, want_hidden=bool(meta.features))
        mask = batch.get("attention_mask")
        rows_mask = mask.to(logits.device).bool() if (mask is not None and meta.grid == "token") else None
        *reduced, ent, top1 = _reduce_batch(reducers, logits, data.sample_ids[idx].tolist(), rows_mask, spec,
                                            teacher.vocab_size)
        out = tuple(reduced)
        if spec.kind != "topk":
            out = sample_targets(logits, spec.draws, spec.temperature, gen, teacher.vocab_size)  # type: ignore[arg-type]
        host = [t.cpu().numpy() for t in (*out, ent, top1)]
        feats = {}
        for f in meta.features:
            h = hidden[f.layer]  # type: ignore[index]
            if f.pool == "mean" and h.ndim == 3:
                m = mask if mask is not None else torch.ones(h.shape[:2])
                h = pool_features(h, m.to(h.device), "mean")
            feats[f.layer] = h.float().cpu().numpy()
        for b, i in enumerate(idx):
            r = lengths[i] if meta.grid == "token" else 1
            per_sample[i] = {"t": [a[b, :r] for a in host[:-2]], "feat": {k: v[b, :r] if v.ndim == 3 else v[b] for k, v in feats.items()}}
            stats["positions"] += r
            if spec.kind == "topk":
                stats["tail_sum"] += float(host[2][b, :r].sum())
            stats["entropy_sum"] += float(host[-2][b, :r].sum())
            stats["top1_prob_sum"] += float(host[-1][b, :r].sum())
    cat = [np.concatenate([s["t"][j] for s in per_sample]) for j in range(len(per_sample[0]["t"]))]
    feats_out = {}
    for f in meta.features:
        vals = [s["feat"][f.layer] for s in per_sample]
        feats_out[f.layer] = np.concatenate(vals) if vals[0].ndim == 2 else np.stack(vals)
    if spec.kind == "topk":
        return {"indices": cat[0], "logp": cat[1], "tail": cat[2], "features": feats_out, "stats": stats}
    return {"indices": cat[0], "counts": cat[1], "features": feats_out, "stats": stats}


def run_teacher(cache: str | os.PathLike[str], cfg: RunConfig, *, storage_options: Mapping[str, Any] | None = None,
                factory_kwargs: Mapping[str, Any] | None = None, progress: bool = True) -> TeacherMeta:
    """Run one teacher over the cache's inputs and store its targets (resumable, shardable).

    Args:
        cache: Cache path or fsspec URL, already `prepare`d.
        cfg: What to compute and how (see `RunConfig`).
        factory_kwargs: Keyword arguments for a `package.module:function` model factory.

    Returns:
        The teacher's metadata as written to `teacher.json`.

    Raises:
        TeacherLoadError: unknown model. CacheMismatchError: tokenizer/vocabulary mismatch.
        CacheExistsError: the teacher exists with other settings and `overwrite` is off.
        NonFiniteLogitsError: NaN/inf logits (names the sample ids).
    """
    store = CacheStore(cache, storage_options)
    reader = CacheReader(store)
    device = resolve_device(cfg.device)
    info = dist_info(device.type)
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        teacher = load_teacher(cfg.model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                               factory_kwargs=factory_kwargs)
        _check_vocab(reader, teacher, cfg)
        tok = reader.inputs.tokenizer
        pad_id = tok.pad_token_id if tok and tok.pad_token_id is not None else 0
        dims, per_token = _probe(reader, teacher, cfg.features, pad_id)
        meta = _teacher_meta(reader, teacher, cfg, dtype, dims, per_token)
        if info.rank == 0:
            store.check_writable()
            writer = TeacherWriter(store, meta, reader.inputs, overwrite=cfg.overwrite, create=True)
        barrier(info)
        if info.rank != 0:
            writer = TeacherWriter(store, meta, reader.inputs, create=False)
            writer.already_complete = store.exists(f"teachers/{cfg.teacher}/teacher.json")
        if writer.already_complete:
            barrier(info)
            return TeacherMeta.from_dict(store.read_json(f"teachers/{cfg.teacher}/teacher.json"))
        pending = writer.pending(info.rank, info.world_size)
        _process(reader, teacher, meta, writer, cfg, pending, device, dtype, pad_id, progress and info.rank == 0)
        barrier(info)
        result = writer.finish() if info.rank == 0 else meta
        barrier(info)
        return result
    finally:
        shutdown(info)


def _process(reader: CacheReader, teacher: LoadedTeacher, meta: TeacherMeta, writer: TeacherWriter,
             cfg: RunConfig, pending: Sequence[int], device: torch.device, dtype: torch.dtype, pad_id: int,
             progress: bool) -> None:
    g = reader.inputs.grid
    total = sum(int(reader._columns["num_positions"][slice(*g.sample_range(c))].sum()) for c in pending)
    bar = tqdm(total=total, desc=f"run {cfg.teacher}", unit=" pos", unit_scale=True, disable=not progress)
    in_flight: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtkd-writer") as pool, \
            _cpu_reducers(device) as reducers:
        for c in pending:
            out = _run_chunk(reader, teacher, meta, cfg, c, device, dtype, pad_id, reducers)
            while len(in_flight) >= 1:  # keep one chunk compressing while the next one computes
                in_flight.pop(0).result()
            in_flight.append(pool.submit(_commit, writer, c, out))
            bar.update(int(out["stats"]["positions"]))
        for f in in_flight:
            f.result()
    bar.close()


def _commit(writer: TeacherWriter, chunk: int, out: dict[str, Any]) -> None:
    keys = ("indices", "logp", "tail", "counts")
    writer.write_chunk(chunk, **{k: out[k] for k in keys if k in out}, features=out["features"], stats=out["stats"])
