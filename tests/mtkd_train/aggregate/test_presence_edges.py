"""Absent teachers at the edges a mutation run found unchecked (docs/TESTING.md): one teacher
present with weight zero, the wrapper's declared context, `loglinear` with one teacher and a
temperature, weights that stay on the targets' device, and the error for a non-linear operator.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationContext,
    AggregationInputError,
    Aggregator,
    build_aggregator,
)
from mtkd_train.aggregate._presence import PresentAggregator, present_weights
from mtkd_train.targets import SparseTargets, TailMode, from_dense, to_dense

V, P = 6, 3
CTX = AggregationContext()


def _teachers(n: int, seed: int = 0) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    return [from_dense(torch.softmax(torch.randn(P, V, generator=g) * 1.5, 1), 2 + i) for i in range(n)]


def test_a_row_whose_only_present_teacher_has_weight_zero_gives_it_all_the_weight() -> None:
    w = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    present = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    got = present_weights(w, present)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_the_wrapper_declares_the_context_of_its_operator() -> None:
    routing = build_aggregator("routing", num_teachers=2, domain_to_teacher={0: 1})
    wrapped = PresentAggregator(routing, torch.ones(P, 2, dtype=torch.bool))
    assert wrapped.context == frozenset({"domains"}) and wrapped.num_teachers == 2
    gate = build_aggregator("gate", num_teachers=2)
    assert PresentAggregator(gate, torch.ones(P, 2, dtype=torch.bool)).context == frozenset({"gate_logits"})


def test_loglinear_with_one_teacher_present_everywhere_is_that_teacher() -> None:
    (t,) = _teachers(1)
    op = build_aggregator("loglinear", num_teachers=1)
    out = PresentAggregator(op, torch.ones(P, 1, dtype=torch.bool))([t], CTX, vocab_size=V, tail_mode="spread")
    torch.testing.assert_close(to_dense(out, V), to_dense(t, V))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_loglinear_keeps_its_temperature_over_the_present_teachers(temperature: float) -> None:
    targets = _teachers(2, seed=1)
    op = build_aggregator("loglinear", num_teachers=2, weights=[1.0, 3.0], temperature=temperature)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    got = to_dense(PresentAggregator(op, present)(targets, CTX, vocab_size=V, tail_mode="spread"), V)
    logs = torch.stack([to_dense(t, V).double().log() for t in targets], dim=1)  # (P, 2, V)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)[..., None] / temperature
    want = torch.softmax(torch.where(w > 0, w * logs, 0.0).sum(1), -1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_weights_stay_on_the_targets_device() -> None:
    """The meta device stands in for a GPU: a presence mask left on the CPU cannot meet meta weights."""
    targets = [SparseTargets(torch.zeros(P, 2, dtype=torch.int64, device="meta"), torch.empty(P, 2, device="meta"),
                             torch.empty(P, device="meta")) for _ in range(2)]
    op = build_aggregator("mean", num_teachers=2)
    w = PresentAggregator(op, torch.tensor([[True, False]] * P)).weights(targets, CTX)
    assert w is not None and w.device.type == "meta" and w.shape == (P, 2)


class _Product(Aggregator):
    """A non-linear operator other than loglinear: no weights."""

    num_teachers = 2

    def weights(self, targets: Sequence[SparseTargets], ctx: AggregationContext) -> torch.Tensor | None:
        return None

    def __call__(self, targets: Sequence[SparseTargets], ctx: AggregationContext, *, vocab_size: int,
                 tail_mode: TailMode) -> SparseTargets:
        return targets[0]


def test_a_nonlinear_operator_other_than_loglinear_is_refused_by_name() -> None:
    wrapped = PresentAggregator(_Product(), torch.tensor([[True, False]] * P))
    with pytest.raises(AggregationInputError) as err:
        wrapped(_teachers(2), CTX, vocab_size=V, tail_mode="spread")
    assert str(err.value) == ("operator _Product cannot aggregate over the teachers present at each row; use a "
                              "linear operator or loglinear with cross-tokenizer teachers")
