"""Tests for build_aggregator: names, options, errors."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.aggregate import (
    AGGREGATORS,
    AggregationConfigError,
    AggregationContext,
    Aggregator,
    OperatorSetup,
    build_aggregator,
    make_aggregator,
    operator_context,
)
from mtkd_train.targets import from_dense, to_dense

CONTRACT_NAMES = {
    "mean",
    "loglinear",
    "entropy",
    "confidence",
    "label_aware",
    "gate",
    "routing",
    "mtbkd",
}
OPTIONS = {"routing": {"domain_to_teacher": {0: 1}}}


def test_registry_has_exactly_the_contract_names() -> None:
    assert set(AGGREGATORS) == CONTRACT_NAMES


@pytest.mark.parametrize("name", sorted(CONTRACT_NAMES))
def test_every_operator_builds_and_merges_a_normalised_target(name: str) -> None:
    agg = build_aggregator(name, num_teachers=2, **OPTIONS.get(name, {}))
    assert isinstance(agg, Aggregator)
    g = torch.Generator().manual_seed(0)
    targets = [from_dense(torch.softmax(torch.randn(3, 9, generator=g), -1), k) for k in (2, 4)]
    ctx = AggregationContext(
        labels=torch.tensor([1, 2, -100]),
        domains=torch.zeros(3, dtype=torch.long),
        gate_logits=torch.zeros(3, 2),
    )
    out = agg(targets, ctx, vocab_size=9, tail_mode="spread")
    torch.testing.assert_close(to_dense(out, 9).sum(-1), torch.ones(3))
    weights = agg.weights(targets, ctx) if name not in {"entropy", "label_aware", "mtbkd"} else None
    if weights is not None:
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_options_are_passed_through() -> None:
    agg = build_aggregator("mean", num_teachers=2, weights=[1, 3])
    assert agg.teacher_weights == (0.25, 0.75)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(
        AggregationConfigError, match=r"unknown aggregator 'avg'; choose one of \['confidence'"
    ):
        build_aggregator("avg", num_teachers=2)


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(
        AggregationConfigError,
        match=r"does not take option\(s\) \['temp'\]; it accepts \['weights', 'temperature'\]",
    ):
        build_aggregator("loglinear", num_teachers=2, temp=2.0)


def test_make_aggregator_resolves_names_and_vocab_from_declarations() -> None:
    setup = OperatorSetup(teachers=("a", "b"), vocab_size=9, domains=("x", "y"))
    routing = make_aggregator("routing", setup, {"domain_to_teacher": {"x": "b", "y": 0}})
    assert routing.routes == ((0, (0.0, 1.0)), (1, (1.0, 0.0)))
    assert operator_context("routing") == {"domains"} and operator_context("mean") == frozenset()
    assert make_aggregator("entropy", setup, {}).vocab_size == 9  # takes_vocab_size
    assert make_aggregator("confidence", setup, {}).vocab_size is None
    with pytest.raises(AggregationConfigError, match=r"domains \['y'\] have no route"):
        make_aggregator("routing", setup, {"domain_to_teacher": {"x": "a"}})
    with pytest.raises(AggregationConfigError, match="teacher 'c' is not known"):
        make_aggregator("routing", setup, {"domain_to_teacher": {"x": "c", "y": "a"}})
    with pytest.raises(AggregationConfigError, match="has none"):
        make_aggregator("routing", OperatorSetup(("a", "b"), 9, ()), {"domain_to_teacher": {0: 0}})
