"""`mtkd_train.aggregate._base`: the shared validators and the operator's call checks, with the
exact messages (the survivors of the mutation run in docs/TESTING.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mtkd_train.aggregate import AggregationContext, build_aggregator
from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationInputError,
    check_teachers,
    parse_positive,
    parse_weight_vector,
)
from mtkd_train.targets import SparseTargets, from_dense


def _targets(positions: int, k: int, vocab: int = 6) -> SparseTargets:
    probs = torch.softmax(torch.arange(positions * vocab, dtype=torch.float32).reshape(positions, vocab), -1)
    return from_dense(probs, k)


def test_calling_with_another_vocab_size_than_built_names_both_and_the_fix() -> None:
    agg = build_aggregator("entropy", num_teachers=2, vocab_size=6)
    targets = [_targets(3, 2), _targets(3, 3)]
    agg(targets, AggregationContext(), vocab_size=6, tail_mode="spread")  # the built size is accepted
    with pytest.raises(AggregationInputError) as err:
        agg(targets, AggregationContext(), vocab_size=7, tail_mode="spread")
    assert str(err.value) == (
        "called with vocab_size=7 but built with vocab_size=6; "
        "build the aggregator with the student's vocabulary size"
    )


@pytest.mark.parametrize("value", [math.inf, 0, -1.0, math.nan, "1", None])
def test_parse_positive_refuses_infinity_and_non_positive_values(value: object) -> None:
    with pytest.raises(AggregationConfigError, match=re.escape(f"tau must be a positive finite number, got {value!r}")):
        parse_positive("tau", value)  # type: ignore[arg-type]


def test_parse_positive_returns_a_float() -> None:
    assert parse_positive("tau", 2) == 2.0
    assert isinstance(parse_positive("tau", 2), float)


@pytest.mark.parametrize("bad", [math.inf, -0.5, math.nan])
def test_parse_weight_vector_refuses_infinite_negative_or_nan_entries(bad: float) -> None:
    with pytest.raises(AggregationConfigError) as err:
        parse_weight_vector("weights", [1.0, bad], 2)
    assert str(err.value) == f"weights={[1.0, bad]} must be non-negative finite numbers"


def test_parse_weight_vector_normalises_and_checks_length_and_zero_sum() -> None:
    assert parse_weight_vector("weights", [1, 0, 3], 3) == (0.25, 0.0, 0.75)
    with pytest.raises(AggregationConfigError, match=re.escape("has 2 entries, expected one per teacher (3)")):
        parse_weight_vector("weights", [1, 2], 3)
    with pytest.raises(AggregationConfigError, match="are all zero"):
        parse_weight_vector("weights", [0, 0], 2)


def test_check_teachers_refuses_three_dimensional_targets_with_equal_positions() -> None:
    flat = _targets(4, 2)
    batched = SparseTargets(flat.indices.reshape(2, 2, 2), flat.logp.reshape(2, 2, 2), flat.tail.reshape(2, 2))
    with pytest.raises(AggregationInputError) as err:
        check_teachers([batched, batched], 2)
    assert str(err.value) == (
        "each teacher's targets must be (P, K_i) with the same P; got shapes [(2, 2, 2), (2, 2, 2)]. "
        "Flatten (B, T, K) to (B*T, K) first."
    )


def test_check_teachers_refuses_different_positions_and_returns_p() -> None:
    assert check_teachers([_targets(3, 2), _targets(3, 4)], 2) == 3
    assert check_teachers([_targets(5, 2)], 1) == 5  # P, not K, and with a single teacher
    with pytest.raises(AggregationInputError, match=re.escape("got shapes [(3, 2), (4, 2)]")):
        check_teachers([_targets(3, 2), _targets(4, 2)], 2)
    with pytest.raises(AggregationInputError, match="got targets from 1 teachers, .* num_teachers=2"):
        check_teachers([_targets(3, 2)], 2)
