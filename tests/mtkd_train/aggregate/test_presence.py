"""Aggregation with absent teachers (cross-tokenizer rows): the operator over the teachers present.

The reduction property: at each row, `PresentAggregator(op_N, present)` equals the same operator
built for the present teachers only (their options restricted to them). Every axiom of
docs/AGGREGATION.md that holds for the operator on any teacher set therefore holds with absent
teachers, on the present ones. With every teacher present the wrapper is the operator itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mtkd_train.aggregate import AggregationContext, Aggregator, build_aggregator
from mtkd_train.aggregate._presence import PresentAggregator, kd_rows, present_weights, row_presence
from mtkd_train.targets import SparseTargets, from_dense, to_dense

V, P = 7, 4
BASE = [1.0, 2.0, 0.5]
OTHER = [0.3, 0.3, 3.0]

MAKERS: dict[str, Callable[[list[int]], Aggregator]] = {
    "mean": lambda ix: build_aggregator("mean", num_teachers=len(ix), weights=[BASE[i] for i in ix]),
    "loglinear": lambda ix: build_aggregator("loglinear", num_teachers=len(ix), weights=[BASE[i] for i in ix]),
    "entropy": lambda ix: build_aggregator("entropy", num_teachers=len(ix), tau=0.5,
                                           base_weights=[BASE[i] for i in ix], vocab_size=V),
    "confidence": lambda ix: build_aggregator("confidence", num_teachers=len(ix), tau=0.2,
                                              base_weights=[BASE[i] for i in ix]),
    "label_aware": lambda ix: build_aggregator("label_aware", num_teachers=len(ix),
                                               base_weights=[BASE[i] for i in ix], vocab_size=V),
    "mtbkd": lambda ix: build_aggregator("mtbkd", num_teachers=len(ix), prior_strength=0.2,
                                         base_weights=[BASE[i] for i in ix], vocab_size=V),
    "gate": lambda ix: build_aggregator("gate", num_teachers=len(ix)),
    "routing": lambda ix: build_aggregator("routing", num_teachers=len(ix),
                                           domain_weights={0: [BASE[i] for i in ix], 1: [OTHER[i] for i in ix]}),
}

PRESENT = torch.tensor([[True, True, False], [True, False, False], [False, True, True], [True, True, True]])


def _world() -> tuple[list[SparseTargets], AggregationContext]:
    g = torch.Generator().manual_seed(0)
    targets = [from_dense(torch.softmax(torch.randn(P, V, generator=g) * 1.5, 1), k) for k in (3, 5, 7)]
    ctx = AggregationContext(labels=torch.randint(0, V, (P,), generator=g), domains=torch.tensor([0, 1, 0, 1]),
                             gate_logits=torch.randn(P, 3, generator=g))
    return targets, ctx


def _row(t: SparseTargets, r: int) -> SparseTargets:
    return SparseTargets(*(x[r : r + 1] for x in t))


def _row_ctx(ctx: AggregationContext, r: int, ix: list[int]) -> AggregationContext:
    assert ctx.labels is not None and ctx.domains is not None and ctx.gate_logits is not None
    return AggregationContext(labels=ctx.labels[r : r + 1], domains=ctx.domains[r : r + 1],
                              gate_logits=ctx.gate_logits[r : r + 1, ix])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_absent_teachers_reduce_to_the_operator_over_the_present_ones(name: str) -> None:
    targets, ctx = _world()
    wrapped = PresentAggregator(MAKERS[name]([0, 1, 2]), PRESENT)
    got = to_dense(wrapped(targets, ctx, vocab_size=V, tail_mode="spread"), V)
    for r in range(P):
        ix = [i for i in range(3) if PRESENT[r, i]]
        sub = MAKERS[name](ix)
        want = to_dense(sub([_row(targets[i], r) for i in ix], _row_ctx(ctx, r, ix), vocab_size=V,
                            tail_mode="spread"), V)
        torch.testing.assert_close(got[r : r + 1], want, rtol=1e-5, atol=1e-6, msg=f"{name} row {r}")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_every_teacher_present_is_the_operator_itself(name: str) -> None:
    targets, ctx = _world()
    op = MAKERS[name]([0, 1, 2])
    all_present = torch.ones(P, 3, dtype=torch.bool)
    a = op(targets, ctx, vocab_size=V, tail_mode="bucket")
    b = PresentAggregator(op, all_present)(targets, ctx, vocab_size=V, tail_mode="bucket")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_weights_are_zero_for_absent_teachers_and_sum_to_one() -> None:
    w = present_weights(torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]),
                        torch.tensor([[True, False, True], [True, True, False], [False, False, False]]))
    torch.testing.assert_close(w, torch.tensor([[2 / 7, 0.0, 5 / 7], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_row_presence_and_kd_rows() -> None:
    batch = {"a": {"logp": torch.zeros(2, 3, 1)}, "b": {"present": torch.tensor([[True, False, True],
                                                                                 [True, True, True]])}}
    mask = torch.tensor([[True, True, False], [True, True, True]])
    present = row_presence(batch, ["a", "b"], lambda x: x[mask])
    assert present is not None and present.tolist() == [[True, True], [True, False], [True, True], [True, True],
                                                        [True, True]]
    assert kd_rows(present) is None  # teacher a is everywhere
    assert row_presence({"a": {"present": torch.ones(1, 2, dtype=torch.bool)}}, ["a"], lambda x: x[0]) is None
    only = torch.tensor([[True, False], [False, False]])
    assert kd_rows(only).tolist() == [True, False]  # type: ignore[union-attr]
