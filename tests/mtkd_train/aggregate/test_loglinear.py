"""Tests for the log-linear (geometric, product-of-experts) operator."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import AggregationContext, LogLinearAggregator, MeanAggregator
from mtkd_train.targets import SparseTargets, from_dense, from_samples, to_dense

V = 7
CTX = AggregationContext()


def _teachers(seed: int = 0) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    return [from_dense(torch.softmax(torch.randn(5, V, generator=g) * 2, -1), k) for k in (2, 4, 3)]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_loglinear_matches_dense_normalised_weighted_geometric_mean(temperature: float) -> None:
    targets = _teachers()
    w = [0.5, 0.3, 0.2]
    out = LogLinearAggregator(3, weights=w, temperature=temperature)(
        targets, CTX, vocab_size=V, tail_mode="spread"
    )
    logs = torch.stack([to_dense(t, V).double().log() for t in targets], dim=1)  # (P, N, V)
    expected = torch.softmax(
        (torch.tensor(w, dtype=torch.double)[:, None] * logs).sum(1) / temperature, -1
    )
    torch.testing.assert_close(to_dense(out, V).double(), expected, atol=1e-6, rtol=1e-5)


def test_loglinear_ignores_tail_mode_and_is_not_a_mixture() -> None:
    targets = _teachers(1)
    agg = LogLinearAggregator(3)
    a = agg(targets, CTX, vocab_size=V, tail_mode="spread")
    b = agg(targets, CTX, vocab_size=V, tail_mode="bucket")
    torch.testing.assert_close(a.logp, b.logp)
    assert agg.weights(targets, CTX) is None


def test_zero_weight_teacher_cannot_veto_a_token() -> None:
    # teacher 1 gives token 0 probability zero, but with weight 0 it must not matter (0^0 = 1)
    t0 = from_samples(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    t1 = from_samples(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))
    out = LogLinearAggregator(2, weights=[1.0, 0.0])(
        [t0, t1], CTX, vocab_size=4, tail_mode="spread"
    )
    torch.testing.assert_close(to_dense(out, 4)[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_disjoint_zero_tail_teachers_fall_back_to_the_mixture() -> None:
    t0 = from_samples(torch.tensor([[0], [0]]), torch.tensor([[1], [1]]))
    t1 = from_samples(torch.tensor([[1], [0]]), torch.tensor([[1], [1]]))
    out = LogLinearAggregator(2)([t0, t1], CTX, vocab_size=3, tail_mode="spread")
    dense = to_dense(out, 3)
    # row 0: no token is possible under both -> the product is empty -> mean; row 1: agree on 0
    torch.testing.assert_close(dense, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    mean = MeanAggregator(2)([t0, t1], CTX, vocab_size=3, tail_mode="spread")
    torch.testing.assert_close(dense[0], to_dense(mean, 3)[0])


def test_loglinear_output_is_normalised_with_exact_tail() -> None:
    out = LogLinearAggregator(3, temperature=2.0)(
        _teachers(2), CTX, vocab_size=V, tail_mode="spread"
    )
    total = out.logp.exp().sum(-1) + out.tail
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    assert bool((out.tail > 0).all())
    assert math.isfinite(float(out.logp[out.logp > -math.inf].sum()))
