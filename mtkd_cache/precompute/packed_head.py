"""The LM head's weight packed once for MKL's GEMM, for the per-group head calls of the precompute.

`headblocks` runs the head on one group of rows at a time (a few hundred at V = 49,152). A plain
``F.linear`` repacks the whole ``(V, D)`` weight into the GEMM's panel layout on every call; MKL's packed
GEMM (``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``, what ``torch.compile``'s CPU
freezing uses) packs it once per row count. On this repository's 2-core CPU at V = 49,152, D = 256 the
head of a 2,048-row batch in groups of 341 rows took 0.125 s packed against 0.168 s plain, and
`run_teacher` / bare forward of the 16.8M teacher fell from 1.50-1.52 to 1.42-1.44
(``benchmarks/head_packing.py``, ``benchmarks/precompute_overhead.py``).

A packed weight is used only where the result equals ``F.linear``'s bit for bit: checked once per
(head, row count) on the first rows it is asked for; otherwise, and for float32-less, non-CPU, non-MKL
heads, fewer than :data:`MIN_ROWS` rows or weights above :data:`MAX_BYTES`, the plain head runs. So the
stored targets stay those of the full-logits path. Each packed copy costs the weight's size; at most
:data:`MAX_PACKINGS` row counts are kept per head (the run's full group and its last, shorter one), the
least recently used dropped first. The packings are made again when the weight is replaced (another tensor
object) or changed in place (its version counter moves); an edit through ``weight.data`` bypasses the
counter and is not seen, so edit a teacher's weights before its first precompute call. Not used for a
weight made under ``torch.inference_mode`` (it has no version counter) or where autograd would need the
product's backward.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F

__all__ = ["linear"]

log = logging.getLogger(__name__)

MIN_ROWS = 16
"""Below this many rows MKL takes another kernel whose last bits differ from the large matmul's."""

MAX_BYTES = 1 << 30
"""No packed copy of a head weight larger than this (a 262,144 x 640 float32 head is 671 MB)."""

_LOCK = threading.Lock()
_PACKED: weakref.WeakKeyDictionary[torch.nn.Linear, dict[int, torch.Tensor | None]] = weakref.WeakKeyDictionary()
_STAMP: weakref.WeakKeyDictionary[torch.nn.Linear, tuple[weakref.ref[torch.Tensor], int]] = weakref.WeakKeyDictionary()
"""Per head, the weight (a weak reference, its in-place version) its packings were made from."""

MAX_PACKINGS = 2
"""Packed copies kept per head, one per row count."""


def _eligible(head: torch.nn.Linear, hidden: torch.Tensor) -> bool:
    w = head.weight
    grad = torch.is_grad_enabled() and (w.requires_grad or hidden.requires_grad)  # the MKL op has no backward
    return (not grad and not w.is_inference() and w.device.type == "cpu" and w.dtype == torch.float32 and hidden.dtype == torch.float32
            and hidden.dim() == 2 and hidden.shape[0] >= MIN_ROWS and hidden.is_contiguous()
            and w.numel() * w.element_size() <= MAX_BYTES and torch.backends.mkl.is_available())


def _pack(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor | None:
    """The weight packed for `hidden`'s row count if its GEMM equals ``F.linear`` on `hidden`, else None."""
    rows = hidden.shape[0]
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(head.weight, rows)
        same = torch.equal(torch.ops.mkl._mkl_linear(hidden, packed, head.weight, head.bias, rows),
                           F.linear(hidden, head.weight, head.bias))
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without the MKL ops
        return None
    if not same:
        log.info("the packed LM head differs from F.linear in the last bits at %d rows: the plain head runs", rows)
    return packed if same else None


def linear(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)``, through the packed weight where it exists and was checked equal (thread-safe)."""
    if not _eligible(head, hidden):
        return head(hidden)
    rows = hidden.shape[0]
    weight = head.weight
    with _LOCK:  # the first worker to need a row count packs it; the others wait for it once
        made_from = _STAMP.get(head)
        if made_from is None or made_from[0]() is not weight or made_from[1] != weight._version:
            _PACKED[head], _STAMP[head] = {}, (weakref.ref(weight), weight._version)  # new or changed weight
        per_rows = _PACKED[head]
        if rows not in per_rows:
            while len(per_rows) >= MAX_PACKINGS:
                del per_rows[next(iter(per_rows))]  # the least recently used
            with torch.inference_mode():
                per_rows[rows] = _pack(head, hidden)
        packed = per_rows.pop(rows)
        per_rows[rows] = packed  # now the most recently used
    if packed is None:
        return head(hidden)
    return torch.ops.mkl._mkl_linear(hidden, packed, head.weight, head.bias, rows)
