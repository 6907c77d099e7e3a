"""`mtkd_train.aggregate._linear`: one-teacher pools and the option errors of ``loglinear``
(survivors of the mutation run in docs/TESTING.md)."""

from __future__ import annotations

import re

import pytest
import torch

from mtkd_train.aggregate import AggregationConfigError, AggregationContext, build_aggregator
from mtkd_train.aggregate._linear import LogLinearAggregator, MeanAggregator, static_weights
from mtkd_train.targets import from_dense, to_dense


def test_a_single_teacher_mean_is_that_teacher() -> None:
    probs = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(1)), -1)
    teacher = from_dense(probs, 3)
    agg = MeanAggregator(1)
    torch.testing.assert_close(agg.weights([teacher], AggregationContext()), torch.ones(4, 1))
    merged = agg([teacher], AggregationContext(), vocab_size=7, tail_mode="spread")
    torch.testing.assert_close(to_dense(merged, 7), to_dense(teacher, 7))


def test_a_single_teacher_loglinear_at_temperature_one_is_that_teacher() -> None:
    probs = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(2)), -1)
    teacher = from_dense(probs, 7)
    merged = LogLinearAggregator(1)([teacher], AggregationContext(), vocab_size=7, tail_mode="bucket")
    torch.testing.assert_close(to_dense(merged, 7), probs)


@pytest.mark.parametrize("name", ["mean", "loglinear"])
def test_bad_weights_are_reported_under_the_option_name(name: str) -> None:
    with pytest.raises(AggregationConfigError) as err:
        build_aggregator(name, num_teachers=2, weights=[1.0, -1.0])
    assert str(err.value) == "weights=[1.0, -1.0] must be non-negative finite numbers"


def test_a_bad_loglinear_temperature_is_reported_under_the_option_name() -> None:
    with pytest.raises(AggregationConfigError, match=re.escape("temperature must be a positive finite number, got 0")):
        build_aggregator("loglinear", num_teachers=2, temperature=0)
    assert LogLinearAggregator(2, temperature=2).temperature == 2.0


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", None])
def test_num_teachers_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(AggregationConfigError) as err:
        MeanAggregator(bad)  # type: ignore[arg-type]
    assert str(err.value) == f"num_teachers must be a positive int, got {bad!r}"


def test_static_weights_are_float32_rows_on_the_targets_device() -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = static_weights((0.25, 0.75), 3, torch.zeros(3, 2, dtype=torch.float64))
    finally:
        torch.set_default_dtype(before)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]] * 3))
    on_meta = static_weights((0.5, 0.5), 4, torch.empty(4, 2, device="meta"))
    assert (on_meta.device.type, tuple(on_meta.shape)) == ("meta", (4, 2))
