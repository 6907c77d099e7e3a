"""Name -> operator registry; the one place the trainer's ``--aggregator NAME`` is resolved."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from mtkd_train.aggregate._base import AggregationConfigError, Aggregator, OperatorSetup
from mtkd_train.aggregate._gate import GateAggregator
from mtkd_train.aggregate._linear import LogLinearAggregator, MeanAggregator
from mtkd_train.aggregate._routing import RoutingAggregator
from mtkd_train.aggregate._scored import (
    ConfidenceAggregator,
    EntropyAggregator,
    LabelAwareAggregator,
    MTBKDAggregator,
)

__all__ = ["AGGREGATORS", "build_aggregator", "make_aggregator", "operator_context"]

AGGREGATORS: dict[str, type[Aggregator]] = {
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
    cls = _operator(name)
    accepted = [p for p in inspect.signature(cls).parameters if p != "num_teachers"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise AggregationConfigError(
            f"aggregator {name!r} does not take option(s) {unknown}; it accepts {accepted}"
        )
    return cls(num_teachers=num_teachers, **kwargs)  # type: ignore[call-arg]


def _operator(name: str) -> type[Aggregator]:
    if name not in AGGREGATORS:
        raise AggregationConfigError(
            f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}"
        )
    return AGGREGATORS[name]


def operator_context(name: str) -> frozenset[str]:
    """The :class:`AggregationContext` fields operator ``name`` reads per batch.

    Raises:
        AggregationConfigError: unknown name.
    """
    return _operator(name).context


def make_aggregator(name: str, setup: OperatorSetup, options: Mapping[str, Any]) -> Aggregator:
    """Build operator ``name`` from the options a user wrote (names allowed where it takes codes).

    The operator resolves its own options (:meth:`Aggregator.resolve_options`) and says whether
    it takes ``vocab_size`` (``takes_vocab_size``); nothing here knows a particular operator.

    Args:
        name: One of :data:`AGGREGATORS`.
        setup: The run's teachers, vocabulary size and domains.
        options: The operator's options as written in the config.

    Returns:
        The operator.

    Raises:
        AggregationConfigError: unknown name, option or value, or a name that does not resolve.
    """
    cls = _operator(name)
    kwargs = cls.resolve_options(options, setup)
    if cls.takes_vocab_size:
        kwargs.setdefault("vocab_size", setup.vocab_size)
    return build_aggregator(name, num_teachers=len(setup.teachers), **kwargs)
