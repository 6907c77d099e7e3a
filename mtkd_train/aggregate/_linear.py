"""Static-weight operators: ``mean`` (linear pooling) and ``loglinear`` (geometric pooling).

Plus the helpers other operators share: :func:`parse_num_teachers` and :func:`static_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    Aggregator,
    check_teachers,
    parse_positive,
    parse_weight_vector,
)
from mtkd_train.aggregate._pooling import log_linear_pool
from mtkd_train.targets import SparseTargets, TailMode

__all__ = ["LogLinearAggregator", "MeanAggregator", "parse_num_teachers", "static_weights"]


def static_weights(values: Sequence[float], num_positions: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-teacher weight vector to ``(P, N)`` on ``like``'s device, float32."""
    w = torch.tensor(values, dtype=torch.float32, device=like.device)  # (N,)
    return w.unsqueeze(0).expand(num_positions, -1)


def parse_num_teachers(value: int) -> int:
    """Validate ``num_teachers`` (a positive int)."""
    if not isinstance(value, int) or value < 1:
        raise AggregationConfigError(f"num_teachers must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class MeanAggregator(Aggregator):
    """``mean``: ``m(v) = sum_i w_i p_i(v)`` with static weights (default uniform).

    Attributes:
        num_teachers: ``N``.
        teacher_weights: Normalised static weights; pass ``weights=`` to the constructor.
    """

    num_teachers: int
    teacher_weights: tuple[float, ...] = field(default=())

    def __init__(self, num_teachers: int, weights: Sequence[float] | None = None) -> None:
        n = parse_num_teachers(num_teachers)
        parsed = parse_weight_vector("weights", [1.0] * n if weights is None else weights, n)
        object.__setattr__(self, "num_teachers", n)
        object.__setattr__(self, "teacher_weights", parsed)

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        return static_weights(self.teacher_weights, targets[0].logp.shape[0], targets[0].logp)


@dataclass(frozen=True)
class LogLinearAggregator(Aggregator):
    """``loglinear``: ``g(v) ∝ prod_i p_i(v)^(w_i / T)`` (product of experts).

    Unkept union tokens use the spread value ``t_i / (V - K_i)`` whatever the tail mode (the
    product needs a value per token); see :func:`log_linear_pool`. Non-linear, so
    :meth:`weights` returns ``None``; the static weights are in ``teacher_weights``.

    Attributes:
        num_teachers: ``N``.
        teacher_weights: Normalised static weights (pass ``weights=``; default uniform).
        temperature: ``T > 0``; ``T = 1`` is the plain normalised geometric mean.
    """

    num_teachers: int
    teacher_weights: tuple[float, ...] = field(default=())
    temperature: float = 1.0

    def __init__(
        self,
        num_teachers: int,
        weights: Sequence[float] | None = None,
        temperature: float = 1.0,
    ) -> None:
        n = parse_num_teachers(num_teachers)
        parsed = parse_weight_vector("weights", [1.0] * n if weights is None else weights, n)
        object.__setattr__(self, "num_teachers", n)
        object.__setattr__(self, "teacher_weights", parsed)
        object.__setattr__(self, "temperature", parse_positive("temperature", temperature))

    def weights(self, targets: Sequence[SparseTargets], ctx: AggregationContext) -> None:
        """Always ``None``: the operator is not a mixture."""
        check_teachers(targets, self.num_teachers)
        return None

    def _pool(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int, tail_mode: TailMode
    ) -> SparseTargets:
        """Pooled target on the union support; ``tail_mode`` does not change the result."""
        w = static_weights(self.teacher_weights, targets[0].logp.shape[0], targets[0].logp)
        return log_linear_pool(targets, w, vocab_size=vocab_size, temperature=self.temperature)
