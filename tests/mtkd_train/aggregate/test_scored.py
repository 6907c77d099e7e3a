"""`mtkd_train.aggregate._scored`: scores of padded, tail-free and batched targets, the label
errors and ``mtbkd``'s prior strength (survivors of the mutation run in docs/TESTING.md)."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    build_aggregator,
)
from mtkd_train.aggregate._scored import (
    EntropyAggregator,
    LabelAwareAggregator,
    MTBKDAggregator,
    max_prob,
    teacher_entropy,
)
from mtkd_train.targets import SparseTargets, from_dense, to_dense

V = 6


def _dense_entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def test_entropy_of_a_target_without_tail_is_the_entropy_of_its_kept_tokens() -> None:
    probs = torch.softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(0)), -1)
    full = from_dense(probs, V)  # every token kept: tail 0
    assert bool((full.tail == 0).all())
    torch.testing.assert_close(teacher_entropy(full, V), _dense_entropy(probs))


def test_padding_slots_add_nothing_to_entropy_or_max_prob() -> None:
    probs = torch.softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(1)), -1)
    kept = from_dense(probs, 2)
    padded = SparseTargets(
        torch.cat([kept.indices, torch.zeros(3, 2, dtype=torch.int64)], dim=1),
        torch.cat([kept.logp, torch.full((3, 2), -math.inf)], dim=1),
        kept.tail,
    )
    torch.testing.assert_close(teacher_entropy(padded, V), teacher_entropy(kept, V))
    torch.testing.assert_close(max_prob(padded), max_prob(kept))


def test_scores_of_batched_targets_are_per_row() -> None:
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(2)), -1)
    rows = from_dense(probs.reshape(6, V), 4)
    batched = SparseTargets(rows.indices.reshape(2, 3, 4), rows.logp.reshape(2, 3, 4), rows.tail.reshape(2, 3))
    torch.testing.assert_close(teacher_entropy(batched, V), teacher_entropy(rows, V).reshape(2, 3))
    torch.testing.assert_close(max_prob(batched), probs.amax(-1))


@pytest.mark.parametrize(
    ("labels", "got"),
    [(None, "None"), (torch.tensor([1, 2]), "(2,)"), (torch.tensor([[1], [2], [3]]), "(3, 1)")],
)
def test_label_aware_names_the_shape_it_got_and_how_to_pass_labels(labels: torch.Tensor | None, got: str) -> None:
    probs = torch.softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(3)), -1)
    targets = [from_dense(probs, 2), from_dense(probs, 3)]
    with pytest.raises(AggregationInputError) as err:
        LabelAwareAggregator(2, vocab_size=V).weights(targets, AggregationContext(labels=labels))
    assert str(err.value) == (
        f"'label_aware' needs ctx.labels of shape (3,), got {got}; pass the "
        "next-token labels (with -100 for ignored positions) in AggregationContext"
    )


def test_mtbkd_prior_strength_zero_is_the_entropy_operator_and_is_stored_as_float() -> None:
    agg = build_aggregator("mtbkd", num_teachers=2, prior_strength=0)
    assert isinstance(agg, MTBKDAggregator)
    assert type(agg.prior_strength) is float and agg.prior_strength == 0.0
    assert agg._smoothing() == 0.0
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(4)), -1)
    targets = [from_dense(probs[0], 2), from_dense(probs[1], 4)]
    merged = agg(targets, AggregationContext(), vocab_size=V, tail_mode="spread")
    entropy = EntropyAggregator(2)(targets, AggregationContext(), vocab_size=V, tail_mode="spread")
    torch.testing.assert_close(to_dense(merged, V), to_dense(entropy, V))
    half = build_aggregator("mtbkd", num_teachers=2, prior_strength=1 / 2)
    assert half.prior_strength == 0.5 and half._smoothing() == 0.5


def _two_teachers(tail: float) -> list[SparseTargets]:
    lg = math.log
    return [
        SparseTargets(torch.tensor([[1, 100]] * 2), torch.tensor([[lg(0.6), lg(0.2)]] * 2), torch.tensor([tail] * 2)),
        SparseTargets(torch.tensor([[2, 100]] * 2), torch.tensor([[lg(0.5), lg(0.4)]] * 2), torch.tensor([tail] * 2)),
    ]


def test_label_aware_weighs_token_100_like_any_other_label() -> None:
    w = LabelAwareAggregator(2, vocab_size=128).weights(_two_teachers(0.2), AggregationContext(
        labels=torch.tensor([100, -100])))
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 2 / 3], [0.5, 0.5]]))


def test_only_the_rows_no_teacher_allows_fall_back_to_the_base_weights() -> None:
    # Zero tails: label 3 has probability 0 under both teachers (row 1), label 1 only under teacher 0.
    w = LabelAwareAggregator(2, base_weights=[1.0, 3.0], vocab_size=128).weights(
        _two_teachers(0.0), AggregationContext(labels=torch.tensor([1, 3])))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [0.25, 0.75]]))


def test_a_single_label_aware_teacher_gets_all_the_weight() -> None:
    teacher = _two_teachers(0.2)[0]
    w = LabelAwareAggregator(1, vocab_size=128).weights([teacher], AggregationContext(labels=torch.tensor([1, 5])))
    torch.testing.assert_close(w, torch.ones(2, 1))


def test_a_zero_base_weight_gives_exactly_zero_weight() -> None:
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(5)), -1)
    targets = [from_dense(probs[0], 2), from_dense(probs[1], 3)]
    w = build_aggregator("confidence", num_teachers=2, base_weights=[1, 0]).weights(targets, AggregationContext())
    assert torch.equal(w, torch.tensor([[1.0, 0.0]] * 3))


def test_scored_weights_keep_the_targets_dtype_and_device() -> None:
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(6)), -1)
    half = [from_dense(probs[0], 2), from_dense(probs[1], 3)]
    half = [SparseTargets(t.indices, t.logp.half(), t.tail.half()) for t in half]
    agg = build_aggregator("confidence", num_teachers=2, base_weights=[1, 3], tau=1)
    assert agg.weights(half, AggregationContext()).dtype == torch.float16
    meta = [SparseTargets(t.indices.to("meta"), t.logp.to("meta"), t.tail.to("meta")) for t in half]
    assert agg.weights(meta, AggregationContext()).device.type == "meta"


@pytest.mark.parametrize("name", ["entropy", "confidence", "label_aware", "mtbkd"])
def test_tau_is_stored_as_a_float(name: str) -> None:
    agg = build_aggregator(name, num_teachers=2, tau=2)
    assert type(agg.tau) is float and agg.tau == 2.0


def test_base_weights_are_checked_under_their_name_and_stored_normalised() -> None:
    agg = build_aggregator("entropy", num_teachers=2, base_weights=[1, 3])
    assert agg.base_weights == (0.25, 0.75)
    with pytest.raises(AggregationConfigError) as err:
        build_aggregator("entropy", num_teachers=2, base_weights=[1, -3])
    assert str(err.value) == "base_weights=[1.0, -3.0] must be non-negative finite numbers"


@pytest.mark.parametrize("bad", [0, -2, 3.0, "8"])
def test_a_bad_vocab_size_is_refused_when_the_operator_is_built(bad: object) -> None:
    with pytest.raises(AggregationConfigError) as err:
        build_aggregator("entropy", num_teachers=2, vocab_size=bad)
    assert str(err.value) == f"vocab_size must be a positive int or None, got {bad!r}"
    assert build_aggregator("entropy", num_teachers=2, vocab_size=1).vocab_size == 1  # the smallest allowed
