"""Edges of `build_union` that survivors of the mutation run (docs/TESTING.md) showed untested:
a batch with no positions (the union width must not be read from an empty tensor) and a union
that covers the whole vocabulary."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.aggregate import AggregationContext, build_aggregator, build_union
from mtkd_train.targets import SparseTargets

EMPTY = SparseTargets(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), torch.zeros(0))


@pytest.mark.parametrize("tail_mode", ["spread", "bucket"])
def test_a_batch_without_positions_has_an_empty_union(tail_mode: str) -> None:
    union = build_union([EMPTY, EMPTY], vocab_size=5, tail_mode=tail_mode)  # type: ignore[arg-type]
    assert [tuple(x.shape) for x in union] == [(0, 0), (0, 0), (0, 2, 0), (0, 2), (0,)]


@pytest.mark.parametrize("name", ["mean", "loglinear", "entropy", "confidence"])
def test_operators_merge_a_batch_without_positions_into_empty_targets(name: str) -> None:
    merged = build_aggregator(name, num_teachers=2)([EMPTY, EMPTY], AggregationContext(), vocab_size=5, tail_mode="spread")
    assert [tuple(x.shape) for x in merged] == [(0, 0), (0, 0), (0,)]


def test_no_mass_is_left_outside_a_union_that_covers_the_vocabulary() -> None:
    # V = 4: teacher 0 keeps {0, 1}, teacher 1 keeps {2, 3}; both have tail mass, but no token is
    # outside the union, so the spread reading puts all of it on the union's unkept tokens.
    t0 = SparseTargets(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([0.2]))
    t1 = SparseTargets(torch.tensor([[2, 3]]), torch.tensor([[0.6, 0.2]]).log(), torch.tensor([0.2]))
    union = build_union([t0, t1], vocab_size=4, tail_mode="spread")
    assert torch.equal(union.size, torch.tensor([4]))
    assert torch.equal(union.tail_out, torch.zeros(1, 2))
    torch.testing.assert_close(union.logp.exp().sum(-1), torch.ones(1, 2))
