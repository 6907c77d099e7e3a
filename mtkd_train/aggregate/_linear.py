"""Static-weight operators: ``mean`` (linear pooling) and ``loglinear`` (geometric pooling).

Plus the small mixin every linear operator shares: its ``__call__`` is :func:`linear_pool` with
the operator's ``(P, N)`` weights, so an operator only says how it computes weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    check_teachers,
    parse_positive,
    parse_weight_vector,
)
from mtkd_train.aggregate._pooling import linear_pool, log_linear_pool
from mtkd_train.targets import SparseTargets, TailMode

__all__ = ["LinearOperator", "LogLinearAggregator", "MeanAggregator", "static_weights"]


def static_weights(values: Sequence[float], num_positions: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-teacher weight vector to ``(P, N)`` on ``like``'s device, float32."""
    w = torch.tensor(values, dtype=torch.float32, device=like.device)  # (N,)
    return w.unsqueeze(0).expand(num_positions, -1)


def parse_num_teachers(value: int) -> int:
    """Validate ``num_teachers`` (a positive int)."""
    if not isinstance(value, int) or value < 1:
        raise AggregationConfigError(f"num_teachers must be a positive int, got {value!r}")
    return value


class LinearOperator:
    """Mixin: a linear operator = a weight rule + :func:`linear_pool`.

    Subclasses define ``num_teachers``, ``_weights(targets, ctx, vocab_size)`` and may define a
    ``vocab_size`` field (needed when the weights depend on the spread tail) and ``_smoothing``.
    """

    num_teachers: int

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _smoothing(self) -> float:
        return 0.0

    def weights(self, targets: Sequence[SparseTargets], ctx: AggregationContext) -> torch.Tensor:
        """``(P, N)`` convex weights (rows sum to one) for these targets and context.

        Raises:
            AggregationInputError: wrong number of teachers or mismatched positions, or a
                context field the operator needs is missing.
        """
        check_teachers(targets, self.num_teachers)
        return self._weights(targets, ctx, getattr(self, "vocab_size", None))

    def __call__(
        self,
        targets: Sequence[SparseTargets],
        ctx: AggregationContext,
        *,
        vocab_size: int,
        tail_mode: TailMode,
    ) -> SparseTargets:
        """Merged target ``sum_i w_i p_i`` on the union support, ``(P, U)``.

        Raises:
            AggregationInputError: as :meth:`weights`, or ``vocab_size`` differs from the one
                the operator was built with.
        """
        check_teachers(targets, self.num_teachers)
        built = getattr(self, "vocab_size", None)
        if built is not None and built != vocab_size:
            raise AggregationInputError(
                f"called with vocab_size={vocab_size} but built with vocab_size={built}; "
                "build the aggregator with the student's vocabulary size"
            )
        w = self._weights(targets, ctx, vocab_size)
        return linear_pool(
            targets, w, vocab_size=vocab_size, tail_mode=tail_mode, smoothing=self._smoothing()
        )


@dataclass(frozen=True)
class MeanAggregator(LinearOperator):
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
class LogLinearAggregator:
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

    def __call__(
        self,
        targets: Sequence[SparseTargets],
        ctx: AggregationContext,
        *,
        vocab_size: int,
        tail_mode: TailMode,
    ) -> SparseTargets:
        """Pooled target on the union support; ``tail_mode`` does not change the result."""
        p = check_teachers(targets, self.num_teachers)
        w = static_weights(self.teacher_weights, p, targets[0].logp)
        return log_linear_pool(targets, w, vocab_size=vocab_size, temperature=self.temperature)
