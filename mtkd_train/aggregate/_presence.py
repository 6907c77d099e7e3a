"""Aggregation when a teacher is absent at some rows (cross-tokenizer teachers, docs/CROSS_TOKENIZER.md).

A teacher cached on its own tokenization has no target at a student row its tokenization does
not align with; the batch marks it with `targets[name]["present"]` (False there). The operator is
then applied to the teachers present at each row: its weights are multiplied by the presence
mask and renormalised over the present teachers (for the softmax-scored and gated operators this
is exactly the operator run on the present subset, since a softmax restricted to a subset and
renormalised is the softmax over that subset). `loglinear` renormalises its static weights the
same way. A row with no teacher present gets no KD term at all (the hard-label term still
applies). Absent teachers' rows are placeholders (all mass in the tail) whose weight is zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtkd_train.aggregate._base import (
    AggregationContext,
    AggregationInputError,
    Aggregator,
    check_teachers,
)
from mtkd_train.aggregate._linear import LogLinearAggregator, static_weights
from mtkd_train.aggregate._pooling import linear_pool, log_linear_pool
from mtkd_train.targets import SparseTargets, TailMode

__all__ = ["PresentAggregator", "present_weights", "row_presence"]


def row_presence(targets: Mapping[str, Mapping[str, torch.Tensor]], teachers: Sequence[str],
                 take: Any) -> torch.Tensor | None:
    """(P, N) bool: teacher i has a target at row p; None when every teacher has every row.

    Args:
        targets: The batch's `targets` (teacher -> arrays, "present" (B, T) for cross-tokenizer teachers).
        teachers: Teacher order of the objective.
        take: `(x (B, T)) -> (P,)` selecting the scored rows (`rows.take_rows` bound to the rows).
    """
    cols = [take(targets[n]["present"]) if "present" in targets[n] else None for n in teachers]
    if all(c is None for c in cols):
        return None
    ref = next(c for c in cols if c is not None)
    present = torch.stack([torch.ones_like(ref) if c is None else c for c in cols], dim=1).bool()
    return None if bool(present.all()) else present


def present_weights(weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """`weights` (P, N) zeroed where a teacher is absent and renormalised over the present ones.

    A row whose present teachers all have weight zero gets equal weights over them; a row with no
    teacher present gets equal weights over all (it is left out of the KD term).
    """
    p = present.to(weights.dtype)
    masked = weights * p
    total = masked.sum(1, keepdim=True)
    count = p.sum(1, keepdim=True)
    fallback = torch.where(count > 0, p / count.clamp(min=1), torch.full_like(p, 1.0 / p.shape[1]))
    return torch.where(total > 0, masked / total.clamp(min=torch.finfo(weights.dtype).tiny), fallback)


class PresentAggregator(Aggregator):
    """`inner` applied over the teachers present at each row (see the module docstring)."""

    def __init__(self, inner: Aggregator, present: torch.Tensor):
        self.inner, self.present = inner, present
        self.num_teachers = inner.num_teachers
        self.context = inner.context  # type: ignore[misc]

    def _smoothing(self) -> float:
        return self.inner._smoothing()

    def weights(self, targets: Sequence[SparseTargets], ctx: AggregationContext) -> torch.Tensor | None:
        w = self.inner.weights(targets, ctx)
        return None if w is None else present_weights(w, self.present.to(w.device))

    def __call__(self, targets: Sequence[SparseTargets], ctx: AggregationContext, *, vocab_size: int,
                 tail_mode: TailMode) -> SparseTargets:
        check_teachers(targets, self.num_teachers)
        w = self.weights(targets, ctx)
        if w is not None:
            return linear_pool(targets, w, vocab_size=vocab_size, tail_mode=tail_mode, smoothing=self._smoothing())
        if isinstance(self.inner, LogLinearAggregator):
            like = targets[0].logp
            w = present_weights(static_weights(self.inner.teacher_weights, like.shape[0], like),
                                self.present.to(like.device))
            return log_linear_pool(targets, w, vocab_size=vocab_size, temperature=self.inner.temperature)
        raise AggregationInputError(f"operator {type(self.inner).__name__} cannot aggregate over the teachers "
                                    f"present at each row; use a linear operator or loglinear with cross-tokenizer teachers")


def kd_rows(present: torch.Tensor | None) -> torch.Tensor | None:
    """(P,) rows with at least one teacher present; None when that is every row."""
    if present is None:
        return None
    rows = present.any(1)
    return None if bool(rows.all()) else rows
