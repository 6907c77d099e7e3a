"""The LM head per row block: for causal LMs whose logits are `head(last hidden state)`, the
`(B, L, V)` logits of a batch never exist at once.

`head_split` finds the teacher's body (`get_decoder()`) and head (`get_output_embeddings()`, a
Linear, plus Gemma's `final_logit_softcapping`) and checks once per model, on a few tokens of
the first batch, that `head(body(x))` equals the model's own logits bit for bit; a model with
any other post-processing (a logit scale, a custom forward) fails that check and keeps the
full-logits path. `reduce_by_head_blocks` then applies the head to one group of row blocks of the
flattened `(B·L, D)` hidden states at a time (at most `GROUP_ELEMENTS` logits; never fewer than 4 rows
unless the batch has fewer), inside the reduction loop: the blocks are exactly the row blocks the
reductions already use (`extract._row_blocks`), so top-k, stats and the sampled draws (same rows per
`multinomial` call, same generator) equal the unblocked path's.

Not possible (full logits are built): classifiers (one row per sample: small anyway), factory
teachers (their forward is opaque), and HF models whose check fails. Peak logits memory per batch
drops from B·L·V to one group of at most `GROUP_ELEMENTS` logits (2^27; on a GPU one row block of
`extract._BLOCK_ELEMENTS` = 2^26 logits, the group there).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from mtkd_cache.format.meta import TargetSpec
from mtkd_cache.precompute.extract import _row_blocks, sample_targets
from mtkd_cache.precompute.forward import forward_teacher, teacher_inputs
from mtkd_cache.precompute.models import LoadedTeacher

__all__ = ["HeadSplit", "forward_body", "head_split", "reduce_by_head_blocks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSplit:
    """A causal LM cut before its head: logits = softcap(head(body(x).last_hidden_state))."""

    body: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, D) hidden rows -> (n, V_padded) logits."""
        with torch.inference_mode():
            out = self.head(hidden)
            if self.softcap:
                out = torch.tanh(out / self.softcap) * self.softcap
        return out


_SPLITS: weakref.WeakKeyDictionary[torch.nn.Module, HeadSplit | None] = weakref.WeakKeyDictionary()


def _candidate(teacher: LoadedTeacher) -> HeadSplit | None:
    module = teacher.module
    if teacher.task != "causal_lm" or not hasattr(module, "get_decoder"):
        return None
    head, body = module.get_output_embeddings(), module.get_decoder()  # type: ignore[operator]
    if not isinstance(head, torch.nn.Linear) or body is None or body is module:
        return None
    config = getattr(module, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    return HeadSplit(body, head, getattr(config, "final_logit_softcapping", None))


def head_split(teacher: LoadedTeacher, batch: Mapping[str, torch.Tensor]) -> HeadSplit | None:
    """The teacher's body/head split if its logits are exactly the head's (checked once per model)."""
    if teacher.module in _SPLITS:
        return _SPLITS[teacher.module]
    split = _candidate(teacher)
    if split is not None:
        probe = {k: v[:1, :8] for k, v in batch.items()}
        full, _ = forward_teacher(teacher, probe, want_hidden=False)
        try:  # a body that needs more than the model's inputs (e.g. a multimodal wrapper) is no split
            last, _ = forward_body(teacher, split, probe, want_hidden=())
            mine = split.logits(last.reshape(-1, last.shape[-1])).reshape(full.shape)
            same = torch.equal(full, mine.to(full.device))
        except (TypeError, ValueError, AttributeError, RuntimeError):
            same = False
        if not same:
            log.info("teacher %r: its logits are not head(last hidden state); the full logits are built",
                     teacher.model_id)
            split = None
    _SPLITS[teacher.module] = split
    return split


def forward_body(teacher: LoadedTeacher, split: HeadSplit, batch: Mapping[str, torch.Tensor], *,
                 want_hidden: Sequence[int]) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...] | None]:
    """The body's last hidden state (B, L, D) and the asked hidden states (as `forward_teacher`)."""
    inputs = teacher_inputs(teacher, batch)  # packed documents isolated, as in forward_teacher
    extra = {"output_hidden_states": list(want_hidden)} if want_hidden else {}
    with torch.inference_mode():
        out = split.body(**inputs, **extra)
    hidden = getattr(out, "hidden_states", None) if want_hidden else None
    return out.last_hidden_state, (tuple(hidden) if hidden is not None else None)


Reduce = Callable[[torch.Tensor, torch.Tensor | None], tuple[list[int], list[torch.Tensor]]]

GROUP_ELEMENTS = 1 << 27
"""At most this many logits per head call on the CPU (512 MiB of float32; 2,730 rows at V = 49,152, 512 at 262,144;
plus a trailing group under MIN_GROUP_ROWS rows, which joins the last; on a GPU one row block of
``extract._BLOCK_ELEMENTS`` per call):
the row blocks are split into the fewest groups of equal size under it. The head's matmul reads its whole
``(V, D)`` weight and repacks it for the GEMM on every call, so small groups lose to the one-call head of
the full-logits path: on 2 cores at V = 49,152, D = 256 the head of a 2,048-row batch took 0.38 s in groups
of 341 rows (2^24 logits) and 0.31-0.32 s in groups of 1,024 rows or whole, and the tiny teacher's run ÷ bare
forward was ~1.26 in groups of 2^26 logits against ~1.18 in one group per batch (session 17,
benchmarks/README.md)."""


MIN_GROUP_ROWS = 4
"""The CPU's float32 matmul takes another kernel below 4 rows, whose last bits differ from the large
matmul's; a trailing group that small joins the previous one, so the logits equal the full-logits path's."""


def _groups(blocks: list[slice], most: int) -> list[list[slice]]:
    """The fewest runs of at most `most` consecutive row blocks, of equal size but the last; a last group of
    fewer than MIN_GROUP_ROWS rows joins the one before it."""
    count = -(-len(blocks) // max(1, most))  # the fewest groups
    per_group = -(-len(blocks) // max(1, count))  # their size
    groups = [blocks[g: g + per_group] for g in range(0, len(blocks), per_group)]
    if len(groups) > 1 and groups[-1][-1].stop - groups[-1][0].start < MIN_GROUP_ROWS:
        tail = groups.pop()
        groups[-1] = groups[-1] + tail
    return groups


def _block_results(split: HeadSplit, flat: torch.Tensor, mask: torch.Tensor | None, blocks: list[slice], vocab: int,
                   reduce: Reduce, pool: Executor | None
                   ) -> Iterator[tuple[slice, torch.Tensor | None, list[int], list[torch.Tensor]]]:
    """(rows, logits, bad rows, outputs) per block, in order.

    The head runs once per group of blocks (:data:`GROUP_ELEMENTS` on the CPU, one block on a GPU) on this thread's torch threads,
    then the group's blocks are reduced: on this thread, with the logits returned (no `pool`), or all
    at once on the single-threaded workers of `pool`, with None for the logits, while this thread
    waits. One group's logits are the peak logits memory. The head is not overlapped with the
    previous group's reductions: beside the workers it oversubscribes the cores, and its GEMM's
    static split waits for its slowest thread (benchmarks/README.md, session 17).
    """
    per_block = max(1, blocks[0].stop - blocks[0].start) if blocks else 1

    def one(rows: slice, logits: torch.Tensor, first: int) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        part = logits[rows.start - first: rows.stop - first]  # one cache-sized block of the group
        return (part, *reduce(part, None if mask is None else mask[rows].to(part.device)))

    # the logits are on the head's device; on a GPU a row block is already 2^26 logits (extract._BLOCK_ELEMENTS):
    # one per head call keeps its memory
    on_cpu = next(split.head.parameters(), flat).device.type == "cpu"
    most = GROUP_ELEMENTS // max(1, per_block * vocab) if on_cpu else 1
    for group in _groups(blocks, most):
        first = group[0].start
        logits = split.logits(flat[first: group[-1].stop]).unsqueeze(1)  # (rows, 1, V_padded)
        if pool is None:
            yield from ((rows, *one(rows, logits, first)) for rows in group)
            continue
        futures = [(rows, pool.submit(one, rows, logits, first)) for rows in group]
        try:
            yield from ((rows, None, *f.result()[1:]) for rows, f in futures)
        finally:  # a consumer that stops early (an error) leaves no queued reduction holding the group's logits
            for _, f in futures:
                f.cancel()


def reduce_by_head_blocks(
    split: HeadSplit, last: torch.Tensor, rows_mask: torch.Tensor | None, spec: TargetSpec, vocab_size: int,
    reduce: Reduce, generator: Callable[[torch.device], torch.Generator], pool: Executor | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """`reduce` (and, for sampled targets, the draws) over head(row block) for every row block.

    Args:
        last: (B, L, D) last hidden state. rows_mask: (B, L) real positions or None.
        reduce: (logits (n, 1, V), mask (n, 1)) -> (bad rows, [outputs (n, 1, ...)]): `chunk._reduce_batch`
            bound to its reducers, or, with `pool`, the single-threaded `chunk._reduce`.
        generator: The chunk's generator on a device (created on first use).
        pool: Single-threaded CPU workers that reduce the row blocks of each group at once
            (top-k targets only: the sampled draws keep one generator's order, on this thread).

    Returns:
        (bad sample indices, outputs reshaped to (B, L, ...)) like `chunk._reduce_batch`, with the
        sampled `indices, counts` first for sampled targets.
    """
    batch, length, width = last.shape
    flat = last.reshape(-1, width)  # (B·L, D)
    mask = None if rows_mask is None else rows_mask.reshape(-1, 1)
    bad: set[int] = set()
    outs: list[torch.Tensor] = []  # preallocated once: small results kept per block would fragment the heap
    device = next(iter(split.head.parameters())).device
    blocks = list(_row_blocks(flat.shape[0], vocab_size, device))
    for rows, logits, bad_rows, reduced in _block_results(split, flat, mask, blocks, vocab_size, reduce,
                                                          pool if spec.kind == "topk" else None):
        bad.update((rows.start + r) // length for r in bad_rows)
        if bad:
            continue  # keep checking the other rows, to name every bad sample
        if spec.kind != "topk":
            assert logits is not None  # sampled targets never run on the pool
            reduced = [*sample_targets(logits, spec.draws, spec.temperature,  # type: ignore[arg-type]
                                       generator(logits.device), vocab_size), *reduced]
        if not outs:
            outs = [torch.empty((flat.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device) for x in reduced]
        for out, x in zip(outs, reduced):
            out[rows] = x
    if bad:
        return sorted(bad), []
    return [], [out.reshape(batch, length, *out.shape[2:]) for out in outs]
