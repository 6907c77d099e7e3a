"""Name -> operator registry; the one place the trainer's ``--aggregator NAME`` is resolved."""

from __future__ import annotations

import inspect
from typing import Any

from mtkd_train.aggregate._base import AggregationConfigError, Aggregator
from mtkd_train.aggregate._gate import GateAggregator
from mtkd_train.aggregate._linear import LogLinearAggregator, MeanAggregator
from mtkd_train.aggregate._routing import RoutingAggregator
from mtkd_train.aggregate._scored import (
    ConfidenceAggregator,
    EntropyAggregator,
    LabelAwareAggregator,
    MTBKDAggregator,
)

__all__ = ["AGGREGATORS", "build_aggregator"]

AGGREGATORS: dict[str, type] = {
    "mean": MeanAggregator,
    "loglinear": LogLinearAggregator,
    "entropy": EntropyAggregator,
    "confidence": ConfidenceAggregator,
    "label_aware": LabelAwareAggregator,
    "gate": GateAggregator,
    "routing": RoutingAggregator,
    "mtbkd": MTBKDAggregator,
}


def build_aggregator(name: str, *, num_teachers: int, **kwargs: Any) -> Aggregator:
    """Build an aggregation operator by name.

    Args:
        name: One of :data:`AGGREGATORS` (``mean``, ``loglinear``, ``entropy``, ``confidence``,
            ``label_aware``, ``gate``, ``routing``, ``mtbkd``).
        num_teachers: ``N``.
        **kwargs: The operator's own options (e.g. ``weights=``, ``tau=``, ``vocab_size=``).

    Returns:
        The operator.

    Raises:
        AggregationConfigError: unknown name, an option the operator does not take, or a bad
            option value.
    """
    if name not in AGGREGATORS:
        raise AggregationConfigError(
            f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}"
        )
    cls = AGGREGATORS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "num_teachers"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise AggregationConfigError(
            f"aggregator {name!r} does not take option(s) {unknown}; it accepts {accepted}"
        )
    return cls(num_teachers=num_teachers, **kwargs)
