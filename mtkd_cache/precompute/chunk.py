"""One chunk of a teacher run: forward its samples in length-grouped batches and reduce the logits.

Per batch, on the teacher's device: a finiteness check over the real vocabulary and the
non-padding positions, then the compressed targets (top-k log-probabilities + exact tail, or
sampled tokens + counts), entropy / top-1 statistics and the requested features. Only those cross
to the host. A batch with non-finite logits is not reduced: its sample ids are collected, the rest
of the chunk is still checked (so every bad sample is named), and the chunk is not committed.
Cost: one teacher forward per position plus O(V) reductions per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtkd_cache.format.meta import TargetSpec, TeacherMeta
from mtkd_cache.format.packing import DOC_START
from mtkd_cache.format.reader import ChunkData
from mtkd_cache.precompute.batching import length_grouped_batches, logits_token_budget, pad_batch
from mtkd_cache.precompute.device import autocast_context
from mtkd_cache.precompute.extract import (
    distribution_stats,
    nonfinite_samples,
    sample_targets,
    topk_targets_checked,
)
from mtkd_cache.precompute.forward import forward_teacher
from mtkd_cache.precompute.headblocks import forward_body, head_split, reduce_by_head_blocks
from mtkd_cache.precompute.models import LoadedTeacher
from mtkd_cache.precompute.pooling import pool_hidden

__all__ = ["ChunkOutput", "batch_inputs", "cpu_reducers", "run_chunk"]


@dataclass
class ChunkOutput:
    """What one chunk produced: host arrays in sample order and stats, or the bad sample ids."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """indices, logp, tail (top-k) or indices, counts (sampled); (R, W) / (R,) rows."""
    features: dict[int, np.ndarray] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    nonfinite: list[int] = field(default_factory=list)
    """Sample ids with NaN/inf logits; when not empty the chunk must not be committed."""


def batch_inputs(data: ChunkData, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The model inputs of samples `idx` of a chunk: padded token ids + mask, or stacked arrays."""
    if "token_ids" in data.inputs:
        toks = data.inputs["token_ids"]
        seqs = [toks[data.offsets[i] : data.offsets[i] + data.lengths[i]] for i in idx]
        batch = pad_batch(seqs, pad_id)
        if DOC_START in data.inputs:  # packed: the teacher isolates each document (forward.py)
            marks = [data.inputs[DOC_START][data.offsets[i] : data.offsets[i] + data.lengths[i]] for i in idx]
            batch[DOC_START] = pad_batch(marks, 0)["input_ids"].bool()
        return batch
    return {k: torch.from_numpy(np.ascontiguousarray(v[list(idx)])) for k, v in data.inputs.items()}


@dataclass(frozen=True)
class _Reducers:
    """Single-threaded CPU workers for the per-batch reductions (see `_reduce_batch`)."""

    pool: ThreadPoolExecutor
    workers: int


def _reduce(logits: torch.Tensor, rows_mask: torch.Tensor | None, spec: TargetSpec, vocab_size: int
            ) -> tuple[list[int], list[torch.Tensor]]:
    """(rows with non-finite logits, []) or ([], [indices, logp, tail] (top-k only) + [entropy, top1])."""
    outputs: tuple[torch.Tensor, ...] = ()
    if spec.kind == "topk":  # the finiteness check rides on the top-k pass
        bad, outputs = topk_targets_checked(logits, spec.k, spec.temperature, vocab_size,  # type: ignore[arg-type]
                                            mask=rows_mask)
    else:
        bad = nonfinite_samples(logits, mask=rows_mask, vocab_size=vocab_size)  # (B,)
        if not bool(bad.any()):
            outputs = distribution_stats(logits, spec.temperature, vocab_size)
    if bool(bad.any()):
        return bad.nonzero().flatten().tolist(), []
    return [], list(outputs)  # (B, T, ...) each


def _reduce_batch(reducers: _Reducers | None, logits: torch.Tensor, rows_mask: torch.Tensor | None,
                  spec: TargetSpec, vocab_size: int) -> tuple[list[int], list[torch.Tensor]]:
    """`_reduce` on the device, or on the CPU split by samples over the single-threaded `reducers`.

    The O(V) reductions are many short passes over cache-sized row blocks. Under torch's
    intra-op threads each pass is a parallel region whose barrier waits for every thread, and on
    a shared CPU a descheduled thread stalls each of the ~10^3 barriers per batch (5x slower than
    one thread at load 6 on 2 cores; benchmarks/precompute_overhead.py). Slices of the batch on
    workers with one intra-op thread each never wait for one another.
    """
    if reducers is None:
        return _reduce(logits, rows_mask, spec, vocab_size)
    parts = np.array_split(np.arange(logits.shape[0]), min(reducers.workers, logits.shape[0]))
    futures = [reducers.pool.submit(_reduce, logits[p[0]: p[-1] + 1],
                                    None if rows_mask is None else rows_mask[p[0]: p[-1] + 1], spec, vocab_size)
               for p in parts]
    results = [f.result() for f in futures]
    bad = [int(p[0]) + row for p, (rows, _) in zip(parts, results) for row in rows]
    if bad:
        return bad, []
    return [], [torch.cat(pieces) for pieces in zip(*(r for _, r in results))]


@contextlib.contextmanager
def cpu_reducers(device: torch.device) -> Iterator[_Reducers | None]:
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


def run_chunk(data: ChunkData, teacher: LoadedTeacher, meta: TeacherMeta, chunk: int, *, seed: int,
              batch_size: int, max_tokens: int | None, device: torch.device, dtype: torch.dtype, pad_id: int,
              reducers: _Reducers | None = None, on_batch: Callable[[int], None] | None = None) -> ChunkOutput:
    """Forward every sample of one chunk; host arrays in sample order plus stats (see module doc).

    `on_batch(positions)` is called after each batch (the progress bar moves within a chunk).
    """
    n = len(data.sample_ids)
    lengths = data.lengths.tolist() if "token_ids" in data.inputs else [1] * n
    per_sample: list[dict[str, Any]] = [{} for _ in range(n)]
    stats = {"positions": 0.0, "tail_sum": 0.0, "entropy_sum": 0.0, "top1_prob_sum": 0.0}
    spec = meta.target
    if spec.kind != "topk":
        del stats["tail_sum"]
    gens: dict[str, torch.Generator] = {}

    def generator(dev: torch.device) -> torch.Generator:  # on the logits' device (a device-mapped teacher's last GPU)
        if "g" not in gens:
            gens["g"] = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + chunk)
        return gens["g"]

    result = ChunkOutput(stats=stats)
    with autocast_context(device, dtype):  # one probe per model (cached): is the head applied per row block?
        split = head_split(teacher, batch_inputs(data, [0], pad_id)) if meta.grid == "token" and n else None
    budget = logits_token_budget(max_tokens, teacher.padded_vocab_size, full_logits=split is None,
                                 dtype_bytes=torch.finfo(dtype).bits // 8)
    for idx in length_grouped_batches(lengths, budget, batch_size):
        batch = batch_inputs(data, idx, pad_id)
        mask = batch.get("attention_mask")
        bad, reduced, hidden = _forward_reduce(teacher, meta, batch, device, dtype, reducers, generator)
        if on_batch is not None:
            on_batch(sum(lengths[i] for i in idx))  # input positions, as the bar's total counts them
        result.nonfinite.extend(int(data.sample_ids[idx[b]]) for b in bad)
        if result.nonfinite:
            continue  # this chunk is lost; keep checking its other batches to name every bad sample
        *out, ent, top1 = reduced
        host = [t.cpu().numpy() for t in (*out, ent, top1)]
        feats = _features(meta, hidden, mask)
        for b, i in enumerate(idx):
            r = lengths[i] if meta.grid == "token" else 1
            per_sample[i] = {"t": [a[b, :r] for a in host[:-2]],
                             "feat": {k: v[b, :r] if v.ndim == 3 else v[b] for k, v in feats.items()}}
            stats["positions"] += r
            if spec.kind == "topk":
                stats["tail_sum"] += float(host[2][b, :r].sum())
            stats["entropy_sum"] += float(host[-2][b, :r].sum())
            stats["top1_prob_sum"] += float(host[-1][b, :r].sum())
    if result.nonfinite:
        return result
    cat = [np.concatenate([s["t"][j] for s in per_sample]) for j in range(len(per_sample[0]["t"]))]
    names = ("indices", "logp", "tail") if spec.kind == "topk" else ("indices", "counts")
    result.arrays = dict(zip(names, cat))
    for f in meta.features:
        vals = [s["feat"][f.layer] for s in per_sample]
        result.features[f.layer] = np.concatenate(vals) if vals[0].ndim == 2 else np.stack(vals)
    return result


def _forward_reduce(teacher: LoadedTeacher, meta: TeacherMeta, batch: dict[str, torch.Tensor], device: torch.device,
                    dtype: torch.dtype, reducers: _Reducers | None, generator: Callable[[torch.device], torch.Generator]
                    ) -> tuple[list[int], list[torch.Tensor], Sequence[torch.Tensor | None] | None]:
    """Forward one batch and reduce it: (bad batch rows, [targets..., entropy, top1], hidden states).

    A causal LM whose logits are head(last hidden) gets its head per row block inside the reduction
    (`headblocks`); any other teacher builds its full logits first.
    """
    spec, want = meta.target, tuple(f.layer for f in meta.features)
    mask = batch.get("attention_mask")
    with autocast_context(device, dtype):
        split = head_split(teacher, batch) if meta.grid == "token" and mask is not None else None
        if split is not None:
            last, hidden = forward_body(teacher, split, batch, want_hidden=want)
            rows_mask = mask.to(last.device).bool()  # type: ignore[union-attr]
            on_workers = reducers is not None and spec.kind == "topk"  # head + reduction per block on a worker
            bad, reduced = reduce_by_head_blocks(
                split, last, rows_mask, spec, teacher.vocab_size,
                (lambda lg, m: _reduce(lg, m, spec, teacher.vocab_size)) if on_workers else
                (lambda lg, m: _reduce_batch(reducers, lg, m, spec, teacher.vocab_size)), generator,
                reducers.pool if on_workers and reducers is not None else None)
            return bad, reduced, hidden
        logits, hidden = forward_teacher(teacher, batch, want_hidden=want)
    rows_mask = mask.to(logits.device).bool() if (mask is not None and meta.grid == "token") else None
    bad, reduced = _reduce_batch(reducers, logits, rows_mask, spec, teacher.vocab_size)
    if bad or spec.kind == "topk":
        return bad, reduced, hidden
    draws = sample_targets(logits, spec.draws, spec.temperature, generator(logits.device), teacher.vocab_size)  # type: ignore[arg-type]
    return bad, [*draws, *reduced], hidden


def _features(meta: TeacherMeta, hidden: Sequence[torch.Tensor | None] | None, mask: torch.Tensor | None
              ) -> dict[int, np.ndarray]:
    feats = {}
    for f in meta.features:
        h = hidden[f.layer]  # type: ignore[index]
        assert h is not None, f"layer {f.layer} was requested from the teacher"
        h = pool_hidden(h, mask, f.pool)  # mean, cls, ... as the teacher was trained (precompute/pooling.py)
        feats[f.layer] = h.float().cpu().numpy()
    return feats
