"""The union of N teachers' supports, per position, with every teacher's value on it.

Algorithm (vectorised, no loop over positions): concatenate the N index rows ``(P, sum K_i)``,
replace padding by a sentinel that sorts last, sort each row, mark first occurrences, and take a
cumulative sum to give every entry its slot in the union. Scattering each entry's log-probability
to ``(teacher, slot)`` yields a ``(P, N, U)`` table; slots a teacher did not keep hold the value
the tail mode assigns (spread value or zero). Cost: ``O(P * C log C)`` for ``C = sum K_i``, memory
``O(P * N * U)`` with ``U <= C``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mtkd_train.targets import SparseTargets, TailMode, parse_tail_mode, spread_log_value

__all__ = ["UnionTargets", "build_union"]

_SENTINEL = torch.iinfo(torch.int64).max


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


def _slots(targets: Sequence[SparseTargets]) -> tuple[torch.Tensor, ...]:
    """Sort/unique the concatenated rows; returns keys, slots, owners and union sizes."""
    idx = torch.cat([t.indices for t in targets], dim=1)  # (P, C)
    logp = torch.cat([t.logp for t in targets], dim=1)  # (P, C)
    owner = torch.cat(
        [torch.full((t.indices.shape[1],), i, device=idx.device) for i, t in enumerate(targets)]
    )  # (C,)
    key = torch.where(logp > -math.inf, idx, torch.full_like(idx, _SENTINEL))  # (P, C)
    sorted_key, order = key.sort(dim=1)  # (P, C)
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    rank = first.cumsum(dim=1) - 1  # (P, C) slot of each sorted entry
    slot = torch.empty_like(rank).scatter(1, order, rank)  # (P, C) slot of each original entry
    size = (first & (sorted_key != _SENTINEL)).sum(dim=1)  # (P,)
    return logp, owner, sorted_key, rank, slot, size


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
    logp, owner, sorted_key, rank, slot, size = _slots(targets)
    p = logp.shape[0]
    width = int(size.max()) if p > 0 else 0  # U; one host sync per batch
    # Union ids: every entry writes its own key to its slot; duplicates write equal values.
    ids = torch.zeros((p, width + 1), dtype=torch.int64, device=logp.device)
    ids = ids.scatter(1, rank.clamp(max=width), sorted_key)[:, :width]  # (P, U)
    valid = torch.arange(width, device=logp.device) < size.unsqueeze(1)  # (P, U)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    tails = torch.stack([t.tail for t in targets], dim=1)  # (P, N)
    if tail_mode == "spread":
        fill = torch.stack([spread_log_value(t, vocab_size) for t in targets], dim=1)  # (P, N)
        outside = (vocab_size - size).to(tails.dtype).unsqueeze(1)  # (P, 1)
        tail_out = torch.where(fill > -math.inf, (fill + outside.clamp(min=1).log()).exp(), 0.0)
        tail_out = torch.where(outside > 0, tail_out, torch.zeros_like(tail_out))  # (P, N)
    else:
        fill = torch.full_like(tails, -math.inf)
        tail_out = tails
    table = fill.unsqueeze(-1).expand(p, n, width + 1).reshape(p, n * (width + 1))
    flat = owner.unsqueeze(0) * (width + 1) + slot.clamp(max=width)  # (P, C)
    # Padding entries land in their own sentinel slot (>= U_p), overwritten by -inf below.
    table = table.scatter(1, flat, logp).view(p, n, width + 1)[:, :, :width]  # (P, N, U)
    table = torch.where(valid.unsqueeze(1), table, torch.full_like(table, -math.inf))
    return UnionTargets(ids, valid, table, tail_out, size)
