"""Tests for task routing by domain code."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    RoutingAggregator,
)
from mtkd_train.targets import SparseTargets, from_dense, to_dense

V = 6


def _teachers() -> list[SparseTargets]:
    g = torch.Generator().manual_seed(0)
    return [from_dense(torch.softmax(torch.randn(4, V, generator=g) * 2, -1), k) for k in (2, 3)]


def test_domain_to_teacher_selects_the_routed_teacher() -> None:
    targets = _teachers()
    agg = RoutingAggregator(2, domain_to_teacher={7: 1, -3: 0})
    ctx = AggregationContext(domains=torch.tensor([7, -3, -3, 7]))
    assert agg.weights(targets, ctx).tolist() == [[0, 1], [1, 0], [1, 0], [0, 1]]
    dense = to_dense(agg(targets, ctx, vocab_size=V, tail_mode="spread"), V)
    routed = [1, 0, 0, 1]
    for row, teacher in enumerate(routed):
        torch.testing.assert_close(dense[row], to_dense(targets[teacher], V)[row])


def test_domain_weights_mix_per_domain() -> None:
    agg = RoutingAggregator(2, domain_weights={0: [1.0, 3.0], 1: [1.0, 0.0]})
    w = agg.weights(_teachers(), AggregationContext(domains=torch.tensor([0, 1, 1, 0])))
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75], [1, 0], [1, 0], [0.25, 0.75]]))


def test_unknown_domain_is_named() -> None:
    agg = RoutingAggregator(2, domain_to_teacher={0: 0, 1: 1})
    with pytest.raises(AggregationInputError, match=r"domain\(s\) \[5, 9\] have no route"):
        agg.weights(_teachers(), AggregationContext(domains=torch.tensor([0, 9, 5, 1])))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of"),
        ({"domain_to_teacher": {0: 0}, "domain_weights": {0: [1, 1]}}, "exactly one of"),
        ({"domain_to_teacher": {0: 2}}, r"domain_to_teacher\[0\]=2 must be a teacher index"),
        ({"domain_weights": {4: [1.0]}}, r"domain_weights\[4\]=\[1.0\] has 1 entries"),
        ({"domain_weights": {}}, "empty"),
    ],
)
def test_routing_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(AggregationConfigError, match=match):
        RoutingAggregator(2, **kwargs)


def test_routing_needs_domains() -> None:
    with pytest.raises(AggregationInputError, match="ctx.domains"):
        RoutingAggregator(2, domain_to_teacher={0: 0}).weights(_teachers(), AggregationContext())
