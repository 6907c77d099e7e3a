"""Shared vocabulary of the aggregation package: errors, per-batch context, the operator base.

Also holds the small ``parse_*`` validators every operator uses for its options, so that every
bad option is reported the same way: the option, the value, what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mtkd_train.aggregate._pooling import linear_pool
from mtkd_train.targets import SparseTargets, TailMode

__all__ = [
    "AggregationConfigError",
    "AggregationContext",
    "AggregationInputError",
    "Aggregator",
    "CONTEXT_FIELDS",
    "OperatorSetup",
    "check_teachers",
    "parse_positive",
    "parse_weight_vector",
]


class AggregationConfigError(ValueError):
    """An aggregator option is invalid; the message names the option, the value and the fix."""


class AggregationInputError(ValueError):
    """The tensors or context handed to an aggregator do not fit it (shape, missing field...)."""


@dataclass(frozen=True)
class AggregationContext:
    """Per-batch side information for data-dependent operators; every field is optional.

    Attributes:
        labels: ``(P,)`` int64 true next token / class per position; ``-100`` = ignore.
        domains: ``(P,)`` int64 domain code per position (for ``routing``).
        gate_logits: ``(P, N)`` output of a learned gate (for ``gate``), already computed by the
            trainer with gradients attached.
    """

    labels: torch.Tensor | None = None
    domains: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None


CONTEXT_FIELDS = ("labels", "domains", "gate_logits")
"""The per-batch fields an operator may declare in :attr:`Aggregator.context`."""


@dataclass(frozen=True)
class OperatorSetup:
    """What the trainer knows when it builds an operator from the names a user wrote.

    Attributes:
        teachers: Teacher names, in the order of the targets (index = teacher code).
        vocab_size: ``V``.
        domains: The cache's domain names (index = domain code); ``()`` for a cache without
            domains, ``None`` when unknown (then only integer codes are accepted).
    """

    teachers: tuple[str, ...]
    vocab_size: int
    domains: tuple[str, ...] | None = None


class Aggregator:
    """Base of every operator: merges N teachers' sparse targets, position by position.

    An operator declares what it needs, so a trainer builds and feeds it without knowing it:

    * ``context``: the :class:`AggregationContext` fields it reads per batch (a subset of
      :data:`CONTEXT_FIELDS`); ``"gate_logits"`` asks the trainer for a gate network on the
      student's hidden state.
    * ``takes_vocab_size``: whether it is built with ``vocab_size=V``.
    * :meth:`resolve_options`: how user-facing names in its options (teachers, domains) become
      the integer codes its constructor takes.

    A linear operator implements ``_weights`` (and ``_smoothing`` if it mixes in the uniform);
    :meth:`__call__` is then :func:`linear_pool` with those weights. A non-linear one overrides
    :meth:`weights` (returning ``None``) and ``_pool``.
    """

    num_teachers: int
    context: ClassVar[frozenset[str]] = frozenset()
    takes_vocab_size: ClassVar[bool] = False

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], setup: OperatorSetup) -> dict[str, Any]:
        """The constructor's keyword arguments for these user options (default: unchanged)."""
        return dict(options)

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _smoothing(self) -> float:
        return 0.0

    def _pool(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int, tail_mode: TailMode
    ) -> SparseTargets:
        w = self._weights(targets, ctx, vocab_size)
        return linear_pool(
            targets, w, vocab_size=vocab_size, tail_mode=tail_mode, smoothing=self._smoothing()
        )

    def weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext
    ) -> torch.Tensor | None:
        """``(P, N)`` convex teacher weights, or ``None`` for a non-linear operator.

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
        """The merged target on the union of the teachers' supports, ``(P, U)``.

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
        return self._pool(targets, ctx, vocab_size, tail_mode)


def parse_positive(option: str, value: float) -> float:
    """Validate a strictly positive finite float option.

    Args:
        option: Option name for the message.
        value: The value.

    Returns:
        ``float(value)``.

    Raises:
        AggregationConfigError: not a positive finite number.
    """
    if not (isinstance(value, int | float) and 0 < value < math.inf):
        raise AggregationConfigError(f"{option} must be a positive finite number, got {value!r}")
    return float(value)


def parse_weight_vector(
    option: str, value: Sequence[float], num_teachers: int
) -> tuple[float, ...]:
    """Validate a static weight vector and normalise it to sum to one.

    Args:
        option: Option name for the message (e.g. ``"weights"``).
        value: One non-negative number per teacher, not all zero.
        num_teachers: Expected length ``N``.

    Returns:
        The normalised weights as a tuple of length ``N``.

    Raises:
        AggregationConfigError: wrong length, a negative/non-finite entry, or all zero.
    """
    values = tuple(float(v) for v in value)
    if len(values) != num_teachers:
        raise AggregationConfigError(
            f"{option}={list(values)} has {len(values)} entries, expected one per teacher "
            f"({num_teachers})"
        )
    if any(not (0 <= v < math.inf) for v in values):
        raise AggregationConfigError(f"{option}={list(values)} must be non-negative finite numbers")
    total = sum(values)
    if total <= 0:
        raise AggregationConfigError(
            f"{option}={list(values)} are all zero; give at least one teacher a positive weight"
        )
    return tuple(v / total for v in values)


def check_teachers(targets: Sequence[SparseTargets], num_teachers: int) -> int:
    """Check N teachers' targets are 2-D and agree on the number of positions.

    Args:
        targets: One :class:`SparseTargets` per teacher, each ``(P, K_i)``.
        num_teachers: Expected ``N``.

    Returns:
        ``P``.

    Raises:
        AggregationInputError: wrong count, not 2-D, or different ``P``.
    """
    if len(targets) != num_teachers:
        raise AggregationInputError(
            f"got targets from {len(targets)} teachers, the aggregator was built for "
            f"num_teachers={num_teachers}"
        )
    shapes = [tuple(t.logp.shape) for t in targets]
    if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise AggregationInputError(
            f"each teacher's targets must be (P, K_i) with the same P; got shapes {shapes}. "
            "Flatten (B, T, K) to (B*T, K) first."
        )
    return shapes[0][0]
