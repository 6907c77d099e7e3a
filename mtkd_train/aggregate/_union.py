"""The union of N teachers' supports, per position, with every teacher's value on it.

Algorithm (vectorised, no loop over positions): concatenate the N index rows ``(P, sum K_i)``,
key each entry by ``row * 2^32 + index`` (padding gets the sentinel ``2^32 - 1``, which sorts last
in its row; on the CPU, with ids checked to lie in ``[0, V)``, ``row * (V + 1) + index`` in int32),
sort the flat ``P * C`` keys once (one 1-D sort is 2-3x faster than ``P`` row sorts on the CPU),
mark first occurrences and take a cumulative sum: every entry gets its
slot in its row's union. Then either:

* :func:`build_union` scatters each entry's log-probability to ``(teacher, slot)``: a
  ``(P, N, U)`` table; slots a teacher did not keep hold the value the tail mode assigns (spread
  value or zero). Memory ``O(P * N * U)``.
* :func:`union_mixture` scatter-adds each entry's weighted probability straight into ``(P, U)``,
  the mixture :func:`~mtkd_train.aggregate._pooling.linear_pool` needs, without the table
  (spread values enter as one per-row constant). Memory ``O(P * C)``.

Cost: one sort of ``P * C`` keys for ``C = sum K_i``, then ``O(P * C)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mtkd_train.targets import SparseTargets, TailMode, parse_tail_mode, spread_log_value

__all__ = ["UnionMixture", "UnionTargets", "build_union", "union_mixture"]

_SPAN = 1 << 32
"""Key room per row: ``row * _SPAN + id`` (the sentinel ``_SPAN - 1`` marks padding), no host sync."""


class UnionTargets(NamedTuple):
    """N teachers' targets laid out on their common (union) support.

    Attributes:
        indices: ``(P, U)`` int64 union token ids; padding slots hold 0.
        valid: ``(P, U)`` bool, False on padding slots (rows have different union sizes).
        logp: ``(P, N, U)`` log-probability of each union token under each teacher: the kept
            value where the teacher kept it, else the tail mode's value (``"spread"``:
            ``log(t_i / (V - K_i))``; ``"bucket"``: ``-inf``). ``-inf`` on padding slots.
        tail_out: ``(P, N)`` each teacher's mass outside the union: ``"spread"``:
            ``t_i (V - U_p) / (V - K_i)``; ``"bucket"``: ``t_i`` (the whole bucket).
        size: ``(P,)`` int64 number of valid union slots ``U_p``.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    logp: torch.Tensor
    tail_out: torch.Tensor
    size: torch.Tensor


class UnionMixture(NamedTuple):
    """A weighted mixture of N teachers on their union support (see :func:`union_mixture`).

    Attributes:
        indices: ``(P, U)`` int64 union token ids; padding slots hold 0.
        valid: ``(P, U)`` bool, False on padding slots.
        probs: ``(P, U)`` ``sum_i w_i p_i(u)`` with the tail mode's value for unkept tokens; 0 on
            padding slots.
        tail_out: ``(P, N)`` each teacher's mass outside the union, as in :class:`UnionTargets`.
        size: ``(P,)`` int64 number of valid union slots ``U_p``.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    probs: torch.Tensor
    tail_out: torch.Tensor
    size: torch.Tensor


class _Layout(NamedTuple):
    logp: torch.Tensor  # (P, C) every entry's log-probability (-inf = padding)
    owner: torch.Tensor  # (C,) teacher of each column
    slot: torch.Tensor  # (P, C) union slot of each entry, clamped to U (padding may land below U)
    ids: torch.Tensor  # (P, U) union token ids, 0 on padding slots
    valid: torch.Tensor  # (P, U)
    size: torch.Tensor  # (P,)


def _layout(targets: Sequence[SparseTargets], vocab_size: int) -> _Layout:
    """Sort/unique the concatenated rows (see the module docstring); kept ids lie in [0, 2^32 - 1)."""
    idx = torch.cat([t.indices for t in targets], dim=1)  # (P, C)
    logp = torch.cat([t.logp for t in targets], dim=1)  # (P, C)
    p, c = idx.shape
    dev = idx.device
    owner = torch.cat([torch.full((t.indices.shape[1],), i, device=dev) for i, t in enumerate(targets)])  # (C,)
    kept = logp > -math.inf
    span, key_dtype = _SPAN, torch.int64
    if dev.type == "cpu" and idx.numel() > 0 and p * (vocab_size + 1) < 2**31:  # int32 keys sort ~1.5x faster here
        lo, hi = torch.aminmax(torch.where(kept, idx, 0))
        if int(lo) >= 0 and int(hi) < vocab_size:
            span, key_dtype = vocab_size + 1, torch.int32
    sentinel = span - 1
    local = torch.where(kept, idx, sentinel).to(key_dtype)  # (P, C)
    base = torch.arange(p, device=dev, dtype=key_dtype).unsqueeze(1) * span  # (P, 1)
    sorted_key, order = (local + base).reshape(-1).sort()  # (P*C,) rows stay in blocks of C
    sorted_local = (sorted_key.view(p, c) - base).long()  # (P, C)
    first = torch.ones_like(sorted_local, dtype=torch.bool)
    first[:, 1:] = sorted_local[:, 1:] != sorted_local[:, :-1]
    rank = first.cumsum(dim=1) - 1  # (P, C) slot of each sorted entry
    size = (first & (sorted_local != sentinel)).sum(dim=1)  # (P,)
    width = int(size.max()) if p > 0 else 0  # U; one host sync per batch
    slot = torch.empty(p * c, dtype=rank.dtype, device=dev).scatter_(0, order, rank.reshape(-1)).view(p, c)
    # Union ids: every entry writes its own id to its slot; duplicates write equal values.
    ids = torch.zeros((p, width + 1), dtype=torch.int64, device=dev)
    ids = ids.scatter_(1, rank.clamp(max=width), sorted_local)[:, :width]  # (P, U)
    valid = torch.arange(width, device=dev) < size.unsqueeze(1)  # (P, U)
    ids = torch.where(valid, ids, 0)
    return _Layout(logp, owner, slot.clamp(max=width), ids, valid, size)


def _tails(targets: Sequence[SparseTargets], size: torch.Tensor, vocab_size: int, tail_mode: TailMode
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, N)`` the value of an unkept union token (log) and each teacher's mass outside the union."""
    tails = torch.stack([t.tail for t in targets], dim=1)  # (P, N)
    if tail_mode == "spread":
        fill = torch.stack([spread_log_value(t, vocab_size) for t in targets], dim=1)  # (P, N)
        outside = (vocab_size - size).to(tails.dtype).unsqueeze(1)  # (P, 1)
        tail_out = torch.where(fill > -math.inf, (fill + outside.clamp(min=1).log()).exp(), 0.0)
        return fill, torch.where(outside > 0, tail_out, torch.zeros_like(tail_out))
    return torch.full_like(tails, -math.inf), tails


def build_union(
    targets: Sequence[SparseTargets], *, vocab_size: int, tail_mode: TailMode
) -> UnionTargets:
    """Lay N teachers' ``(P, K_i)`` targets on the per-position union of their supports.

    Non-padding indices must be distinct within each teacher's row (see
    :func:`mtkd_train.targets.check_targets`). Gradients flow through ``logp`` and ``tail``.

    Args:
        targets: One :class:`SparseTargets` per teacher, shapes ``(P, K_i)``.
        vocab_size: Vocabulary size ``V`` (needed by ``"spread"``).
        tail_mode: How an unkept union token is valued; see :class:`UnionTargets`.

    Returns:
        The union layout; ``U`` is the largest union size in the batch.
    """
    parse_tail_mode(tail_mode)
    n = len(targets)
    lay = _layout(targets, vocab_size)
    p, width = lay.valid.shape
    fill, tail_out = _tails(targets, lay.size, vocab_size, tail_mode)
    table = fill.unsqueeze(-1).expand(p, n, width + 1).reshape(p, n * (width + 1))
    flat = lay.owner.unsqueeze(0) * (width + 1) + lay.slot  # (P, C)
    # Padding entries land in a slot >= U_p, overwritten by -inf below.
    table = table.scatter(1, flat, lay.logp).view(p, n, width + 1)[:, :, :width]  # (P, N, U)
    table = torch.where(lay.valid.unsqueeze(1), table, torch.full_like(table, -math.inf))
    return UnionTargets(lay.ids, lay.valid, table, tail_out, lay.size)


def union_mixture(
    targets: Sequence[SparseTargets], weights: torch.Tensor, *, vocab_size: int, tail_mode: TailMode
) -> UnionMixture:
    """``sum_i w_i p_i`` on the per-position union of the supports, without the ``(P, N, U)`` table.

    Equal (to float rounding) to ``einsum("pn,pnu->pu", w, build_union(...).logp.exp())``.
    Gradients flow through ``weights``, ``logp`` and ``tail``.

    Args:
        targets: One :class:`SparseTargets` per teacher, shapes ``(P, K_i)``; kept indices
            distinct within a row.
        weights: ``(P, N)`` mixture weights.
        vocab_size: Vocabulary size ``V``.
        tail_mode: How an unkept union token is valued; see :class:`UnionTargets`.

    Returns:
        The mixture on the union; ``U`` is the largest union size in the batch.
    """
    parse_tail_mode(tail_mode)
    lay = _layout(targets, vocab_size)
    p, width = lay.valid.shape
    fill, tail_out = _tails(targets, lay.size, vocab_size, tail_mode)
    w = weights.to(lay.logp.dtype)
    w_entry = w[:, lay.owner]  # (P, C)
    kept = lay.logp > -math.inf
    contrib = w_entry * lay.logp.exp()  # padding: exp(-inf) = 0
    base = None
    if tail_mode == "spread":  # an unkept union token gets u_i: sum_i w_i u_i, minus u_i where i kept it
        unit = fill.exp()  # (P, N)
        contrib = torch.where(kept, contrib - w_entry * unit[:, lay.owner], 0.0)
        base = (w * unit).sum(dim=1, keepdim=True)  # (P, 1)
    probs = torch.zeros((p, width + 1), dtype=contrib.dtype, device=contrib.device)
    probs = probs.scatter_add(1, lay.slot, contrib)[:, :width]  # (P, U)
    if base is not None:
        probs = probs + base
    probs = torch.where(lay.valid, probs, 0.0)
    return UnionMixture(lay.ids, lay.valid, probs, tail_out, lay.size)
