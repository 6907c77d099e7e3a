"""Tests for the linear operators mean / entropy / confidence / label_aware / mtbkd."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    ConfidenceAggregator,
    EntropyAggregator,
    LabelAwareAggregator,
    MeanAggregator,
    MTBKDAggregator,
    teacher_entropy,
)
from mtkd_train.targets import SparseTargets, from_dense, to_dense

V = 8
CTX = AggregationContext()


def _teachers(seed: int = 0, ks: tuple[int, ...] = (3, 5), p: int = 4) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, k in enumerate(ks):
        probs = torch.softmax(torch.randn(p, V, generator=g) * (1.0 + i), dim=-1)
        out.append(from_dense(probs, k))
    return out


def _dense_mix(targets: list[SparseTargets], w: torch.Tensor, mode: str) -> torch.Tensor:
    dense = torch.stack([to_dense(t, V, mode) for t in targets], dim=1)  # (P, N, V[+1])
    return torch.einsum("pn,pnv->pv", w, dense)


@pytest.mark.parametrize("mode", ["spread", "bucket"])
def test_mean_is_the_weighted_mixture_of_dense_teachers(mode: str) -> None:
    targets = _teachers()
    agg = MeanAggregator(2, weights=[3.0, 1.0])
    out = agg(targets, CTX, vocab_size=V, tail_mode=mode)
    w = torch.tensor([[0.75, 0.25]]).expand(4, 2)
    torch.testing.assert_close(agg.weights(targets, CTX), w)
    torch.testing.assert_close(to_dense(out, V, mode), _dense_mix(targets, w, mode))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], r"weights=\[1.0\] has 1 entries, expected one per teacher \(2\)"),
        ([1.0, -0.5], r"weights=\[1.0, -0.5\] must be non-negative"),
        ([0.0, 0.0], r"weights=\[0.0, 0.0\] are all zero"),
    ],
)
def test_mean_rejects_bad_weights_naming_the_option(weights: list[float], match: str) -> None:
    with pytest.raises(AggregationConfigError, match=match):
        MeanAggregator(2, weights=weights)
    assert issubclass(AggregationConfigError, ValueError)


def test_wrong_number_of_teachers_is_reported() -> None:
    with pytest.raises(AggregationInputError, match="num_teachers=3"):
        MeanAggregator(3)(_teachers(), CTX, vocab_size=V, tail_mode="spread")


def test_teacher_entropy_matches_dense_entropy() -> None:
    for t in _teachers(seed=3):
        dense = to_dense(t, V).double()
        expected = -(dense * dense.log()).sum(-1)
        torch.testing.assert_close(teacher_entropy(t, V).double(), expected, atol=1e-5, rtol=0)


def test_entropy_weights_are_softmax_of_negative_entropy() -> None:
    targets = _teachers(seed=1)
    agg = EntropyAggregator(2, tau=0.5, vocab_size=V)
    h = torch.stack([teacher_entropy(t, V) for t in targets], dim=1)
    expected = torch.softmax(-h / 0.5, dim=1)
    torch.testing.assert_close(agg.weights(targets, CTX), expected)
    out = agg(targets, CTX, vocab_size=V, tail_mode="spread")
    torch.testing.assert_close(to_dense(out, V), _dense_mix(targets, expected, "spread"))
    # the sharper teacher (lower entropy) gets the larger weight
    assert bool(((h[:, 0] < h[:, 1]) == (expected[:, 0] > expected[:, 1])).all())


def test_base_weights_multiply_the_data_dependent_weights() -> None:
    targets = _teachers(seed=1)
    plain = EntropyAggregator(2, vocab_size=V).weights(targets, CTX)
    based = EntropyAggregator(2, base_weights=[1.0, 3.0], vocab_size=V).weights(targets, CTX)
    expected = plain * torch.tensor([1.0, 3.0])
    torch.testing.assert_close(based, expected / expected.sum(1, keepdim=True))


def test_weights_without_vocab_size_explains_how_to_fix() -> None:
    with pytest.raises(AggregationInputError, match="pass vocab_size=V to build_aggregator"):
        EntropyAggregator(2).weights(_teachers(), CTX)
    with pytest.raises(AggregationInputError, match="built with vocab_size=9"):
        EntropyAggregator(2, vocab_size=9)(_teachers(), CTX, vocab_size=V, tail_mode="spread")


def test_confidence_weights_prefer_the_peaked_teacher() -> None:
    targets = _teachers(seed=2)
    agg = ConfidenceAggregator(2, tau=0.1)
    conf = torch.stack([t.logp[:, 0].exp() for t in targets], dim=1)  # top-1 is column 0
    torch.testing.assert_close(agg.weights(targets, CTX), torch.softmax(conf / 0.1, dim=1))


def _label_teachers() -> list[SparseTargets]:
    lg = math.log
    t0 = SparseTargets(
        torch.tensor([[1, 2], [1, 2], [1, 2]]),
        torch.tensor([[lg(0.6), lg(0.2)]] * 3),
        torch.tensor([0.2] * 3),
    )
    t1 = SparseTargets(
        torch.tensor([[2, 3], [2, 3], [2, 3]]),
        torch.tensor([[lg(0.5), lg(0.4)]] * 3),
        torch.tensor([0.1] * 3),
    )
    return [t0, t1]


def test_label_aware_uses_kept_value_spread_value_and_uniform_fallback() -> None:
    agg = LabelAwareAggregator(2, tau=1.0, vocab_size=V)
    ctx = AggregationContext(labels=torch.tensor([1, 3, -100]))
    w = agg.weights(_label_teachers(), ctx)
    # row 0: label 1 -> p0 = .6 (kept), p1 = .1 / 6 (spread); weights ∝ p under tau = 1
    p0, p1 = 0.6, 0.1 / 6
    torch.testing.assert_close(w[0], torch.tensor([p0, p1]) / (p0 + p1))
    p0, p1 = 0.2 / 6, 0.4  # row 1: label 3
    torch.testing.assert_close(w[1], torch.tensor([p0, p1]) / (p0 + p1))
    torch.testing.assert_close(w[2], torch.tensor([0.5, 0.5]))  # ignored label


def test_label_aware_falls_back_to_base_weights_when_no_teacher_allows_the_label() -> None:
    zero_tail = [SparseTargets(t.indices, t.logp, torch.zeros(3)) for t in _label_teachers()]
    agg = LabelAwareAggregator(2, base_weights=[1.0, 4.0], vocab_size=V)
    w = agg.weights(zero_tail, AggregationContext(labels=torch.tensor([7, 7, 7])))
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.8]] * 3))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (None, "needs ctx.labels of shape"),
        (torch.tensor([1, 2]), "shape"),
        (torch.tensor([1, 2, V]), r"\[0, 8\)"),
    ],
)
def test_label_aware_rejects_missing_or_bad_labels(labels: torch.Tensor | None, match: str) -> None:
    with pytest.raises(AggregationInputError, match=match):
        LabelAwareAggregator(2, vocab_size=V).weights(
            _label_teachers(), AggregationContext(labels=labels)
        )


def test_mtbkd_is_entropy_mixture_smoothed_toward_uniform() -> None:
    targets = _teachers(seed=4)
    agg = MTBKDAggregator(2, tau=2.0, prior_strength=0.3, vocab_size=V)
    w = EntropyAggregator(2, tau=2.0, vocab_size=V).weights(targets, CTX)
    torch.testing.assert_close(agg.weights(targets, CTX), w)
    expected = 0.7 * _dense_mix(targets, w, "spread") + 0.3 / V
    for mode in ("spread", "bucket"):
        out = agg(targets, CTX, vocab_size=V, tail_mode=mode)
        dense = to_dense(out, V, mode)
        assert float(dense.sum(-1).sub(1).abs().max()) < 1e-6
        if mode == "spread":
            torch.testing.assert_close(dense, expected)


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_mtbkd_rejects_bad_prior_strength(bad: float) -> None:
    with pytest.raises(AggregationConfigError, match="prior_strength"):
        MTBKDAggregator(2, prior_strength=bad)


@pytest.mark.parametrize(
    "cls", [EntropyAggregator, ConfidenceAggregator, LabelAwareAggregator, MTBKDAggregator]
)
def test_tau_must_be_positive(cls: type) -> None:
    with pytest.raises(AggregationConfigError, match="tau must be a positive"):
        cls(2, tau=0.0)


def test_gradients_flow_into_targets_through_union() -> None:
    t = _teachers()
    logp = t[0].logp.clone().requires_grad_(True)
    targets = [SparseTargets(t[0].indices, logp, t[0].tail), t[1]]
    out = MeanAggregator(2)(targets, CTX, vocab_size=V, tail_mode="spread")
    out.logp[out.logp > -math.inf].sum().backward()
    assert (
        logp.grad is not None
        and bool(torch.isfinite(logp.grad).all())
        and float(logp.grad.abs().sum()) > 0
    )
