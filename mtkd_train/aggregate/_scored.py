"""Data-dependent linear operators: weights are a softmax over per-teacher scores.

``w_i(pos) = softmax_i(score_i(pos) / tau + log b_i)`` where ``b`` are optional static
``base_weights`` (default uniform). The scores:

* ``entropy``: ``-H_i``, the entropy of teacher i's full-vocabulary distribution under the spread
  reading: ``H_i = -sum_{v in S_i} p_v log p_v - t_i log(t_i / (V - K_i))`` (exact if the tail
  really is uniform; an upper bound on the true entropy for the given kept probabilities).
* ``confidence``: ``max_v p_i(v)`` over kept tokens (for genuine top-k this is the max of the full
  distribution, since an unkept token can not beat a kept one).
* ``label_aware`` (CA-MKD): ``-CE_i = log p_i(label)``, with the spread value when the label is
  not kept; positions with label ``-100`` (or where every teacher gives the label probability 0)
  use the base weights.
* ``mtbkd``: the entropy weights, and the merged target is smoothed toward the uniform
  distribution with ``prior_strength``.

Cost per batch: ``O(P * sum_i K_i)`` for the scores, then :func:`linear_pool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    Aggregator,
    parse_positive,
    parse_weight_vector,
)
from mtkd_train.aggregate._linear import parse_num_teachers
from mtkd_train.targets import SparseTargets, spread_log_value

__all__ = [
    "ConfidenceAggregator",
    "EntropyAggregator",
    "LabelAwareAggregator",
    "MTBKDAggregator",
    "label_log_prob",
    "max_prob",
    "teacher_entropy",
]


def teacher_entropy(t: SparseTargets, vocab_size: int) -> torch.Tensor:
    """Entropy (nats) of the full distribution a sparse target stands for, spread reading.

    Args:
        t: Sparse targets ``(..., K)``.
        vocab_size: ``V``.

    Returns:
        ``(...,)`` ``-sum_kept p log p - tail * log(tail / (V - K_eff))``.
    """
    p = t.logp.exp()  # (..., K)
    kept = torch.where(p > 0, -p * t.logp, 0.0).sum(dim=-1)  # (...,)
    log_u = spread_log_value(t, vocab_size)  # (...,)
    return kept + torch.where(t.tail > 0, -t.tail * log_u, 0.0)


def max_prob(t: SparseTargets) -> torch.Tensor:
    """Largest kept probability per row, ``(...,)``; 0 for an empty row."""
    return t.logp.max(dim=-1).values.exp()


def label_log_prob(t: SparseTargets, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``log p(label)`` per row: the kept value, else the spread value of the tail.

    Args:
        t: Sparse targets ``(P, K)``.
        labels: ``(P,)`` int64; ``-100`` rows give 0 (callers mask them).
        vocab_size: ``V``.

    Returns:
        ``(P,)``; ``-inf`` where the label has probability zero.
    """
    hit = (t.indices == labels.unsqueeze(-1)) & (t.logp > -math.inf)  # (P, K)
    found = torch.where(hit, t.logp, -math.inf).max(dim=-1).values  # (P,)
    value = torch.where(hit.any(dim=-1), found, spread_log_value(t, vocab_size))
    return torch.where(labels == -100, torch.zeros_like(value), value)


def _softmax_weights(
    scores: torch.Tensor, tau: float, base: tuple[float, ...] | None
) -> torch.Tensor:
    """``(P, N)`` softmax of ``scores / tau + log(base)``."""
    logits = scores / tau
    if base is not None:
        b = torch.tensor(base, dtype=logits.dtype, device=logits.device)
        logits = logits + torch.where(b > 0, b.clamp(min=1e-30).log(), -math.inf)
    return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class _ScoredAggregator(Aggregator):
    """Shared shape of the scored operators: ``w = softmax(score / tau + log b)``.

    Subclasses say only how a teacher is scored (``_scores``); the options and their validation
    are common. ``vocab_size`` is needed by the scores that value the spread tail.
    """

    num_teachers: int
    tau: float = 1.0
    base_weights: tuple[float, ...] | None = None
    vocab_size: int | None = None
    takes_vocab_size: ClassVar[bool] = True
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        n = parse_num_teachers(self.num_teachers)
        object.__setattr__(self, "tau", parse_positive("tau", self.tau))
        base = None if self.base_weights is None else parse_weight_vector("base_weights", self.base_weights, n)
        object.__setattr__(self, "base_weights", base)
        v = self.vocab_size
        if v is not None and (not isinstance(v, int) or v < 1):
            raise AggregationConfigError(f"vocab_size must be a positive int or None, got {v!r}")

    def _need_vocab(self, vocab_size: int | None) -> int:
        if vocab_size is None:
            raise AggregationInputError(
                f"the {self.name!r} aggregator needs the vocabulary size to value the tail; pass "
                f"vocab_size=V to build_aggregator({self.name!r}, ...) to call .weights() directly"
            )
        return vocab_size

    def _scores(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        """``(P, N)`` per-teacher scores (higher = more weight)."""
        raise NotImplementedError

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        return _softmax_weights(self._scores(targets, ctx, vocab_size), self.tau, self.base_weights)


@dataclass(frozen=True)
class EntropyAggregator(_ScoredAggregator):
    """``entropy``: ``w_i = softmax_i(-H_i / tau) * b_i`` (confident teachers weigh more).

    Attributes:
        num_teachers: ``N``.
        tau: Softmax temperature over teachers (> 0); large ``tau`` tends to the base weights.
        base_weights: Optional static per-teacher trust ``b`` (normalised), default uniform.
        vocab_size: ``V``; required only to call :meth:`weights` outside ``__call__``.
    """

    name: ClassVar[str] = "entropy"

    def _scores(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        v = self._need_vocab(vocab_size)
        return -torch.stack([teacher_entropy(t, v) for t in targets], dim=1)  # (P, N)


@dataclass(frozen=True)
class ConfidenceAggregator(_ScoredAggregator):
    """``confidence``: ``w_i = softmax_i(max_v p_i(v) / tau) * b_i``.

    Attributes:
        num_teachers: ``N``.
        tau: Softmax temperature over teachers (> 0). Max-probabilities lie in ``[0, 1]``, so
            ``tau`` around 0.1 gives a clear preference, ``tau >= 1`` nearly the base weights.
        base_weights: Optional static per-teacher trust, default uniform.
        vocab_size: Unused (the score needs no tail value); accepted for a uniform interface.
    """

    tau: float = 0.1
    takes_vocab_size: ClassVar[bool] = False
    name: ClassVar[str] = "confidence"

    def _scores(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        return torch.stack([max_prob(t) for t in targets], dim=1)  # (P, N)


@dataclass(frozen=True)
class LabelAwareAggregator(_ScoredAggregator):
    """``label_aware`` (CA-MKD): ``w_i = softmax_i(-CE_i / tau) * b_i``, ``CE_i = -log p_i(y)``.

    Positions with ``y = -100``, or where every teacher gives ``y`` probability zero, get the
    base weights (uniform by default).

    Attributes:
        num_teachers: ``N``.
        tau: Softmax temperature over teachers (> 0).
        base_weights: Optional static per-teacher trust, default uniform.
        vocab_size: ``V``; required only to call :meth:`weights` outside ``__call__``.
    """

    context: ClassVar[frozenset[str]] = frozenset({"labels"})
    name: ClassVar[str] = "label_aware"

    def _labels(self, ctx: AggregationContext, p: int, v: int) -> torch.Tensor:
        labels = ctx.labels
        if labels is None or tuple(labels.shape) != (p,):
            got = None if labels is None else tuple(labels.shape)
            raise AggregationInputError(
                f"'label_aware' needs ctx.labels of shape ({p},), got {got}; pass the "
                "next-token labels (with -100 for ignored positions) in AggregationContext"
            )
        if bool(((labels < 0) & (labels != -100)).any() | (labels >= v).any()):
            raise AggregationInputError(f"ctx.labels must be in [0, {v}) or -100")
        return labels

    def _scores(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        """``log p_i(y)``; labels already checked by :meth:`_weights`."""
        labels, v = ctx.labels, self._need_vocab(vocab_size)
        return torch.stack([label_log_prob(t, labels, v) for t in targets], dim=1)  # type: ignore[arg-type]

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        labels = self._labels(ctx, targets[0].logp.shape[0], self._need_vocab(vocab_size))
        weights = super()._weights(targets, ctx, vocab_size)  # (P, N)
        fallback = _softmax_weights(torch.zeros_like(weights), 1.0, self.base_weights)
        use_fallback = (labels == -100).unsqueeze(1) | torch.isnan(weights).any(1, keepdim=True)
        return torch.where(use_fallback, fallback, weights)


@dataclass(frozen=True)
class MTBKDAggregator(EntropyAggregator):
    """``mtbkd``: entropy-weighted mixture, smoothed toward uniform (a Dirichlet-like prior).

    ``m = (1 - lam) * sum_i w_i p_i + lam * Uniform(V)`` with ``w`` the :class:`EntropyAggregator`
    weights; :meth:`weights` returns ``w`` (the mixture part). With
    :func:`mtkd_train.losses.weighted_forward_kl` pass ``smoothing=self._smoothing()``.

    Attributes:
        num_teachers: ``N``.
        tau: Softmax temperature over teachers (> 0).
        base_weights: Optional static per-teacher trust, default uniform.
        vocab_size: ``V``; required only to call :meth:`weights` outside ``__call__``.
        prior_strength: ``lam`` in ``[0, 1)``; default 0.1 (0 makes the operator ``entropy``).
    """

    prior_strength: float = 0.1
    name: ClassVar[str] = "mtbkd"

    def __post_init__(self) -> None:
        super().__post_init__()
        lam = self.prior_strength
        if not (isinstance(lam, int | float) and 0 <= lam < 1):
            raise AggregationConfigError(f"prior_strength must be in [0, 1), got {lam!r}")
        object.__setattr__(self, "prior_strength", float(lam))

    def _smoothing(self) -> float:
        return self.prior_strength
