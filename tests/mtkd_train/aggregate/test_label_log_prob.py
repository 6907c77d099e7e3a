"""`label_log_prob` (public in `mtkd_train.aggregate`): the documented per-row rule.

``log p(label)`` is the kept value when the label is kept, else the spread value
``log(tail / (V - K_eff))``; rows labelled ``-100`` give 0, whatever their targets.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationContext,
    LabelAwareAggregator,
    build_aggregator,
    label_log_prob,
)
from mtkd_train.targets import SparseTargets

V = 10
NEG = -math.inf


def _targets() -> SparseTargets:
    """4 rows, K = 3; row 2 has a padding entry (-inf) on token 5; row 3 keeps all mass (tail 0)."""
    indices = torch.tensor([[1, 4, 7], [0, 2, 3], [2, 5, 8], [1, 2, 3]])
    p = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.2], [0.6, 0.0, 0.3], [0.5, 0.3, 0.2]])
    logp = torch.where(p > 0, p.log(), torch.full_like(p, NEG))
    tail = 1 - p.sum(-1)
    tail[3] = 0.0
    return SparseTargets(indices, logp, tail)


def test_ignored_rows_give_zero_whatever_the_targets() -> None:
    t = _targets()
    labels = torch.full((4,), -100)
    out = label_log_prob(t, labels, V)
    assert out.shape == (4,)
    assert torch.equal(out, torch.zeros(4))  # row 3 would be -inf (tail 0) if it were scored


def test_kept_labels_give_their_value_and_others_the_spread_value() -> None:
    t = _targets()
    labels = torch.tensor([4, 9, 5, 9])
    out = label_log_prob(t, labels, V)
    assert out[0].item() == pytest.approx(math.log(0.2))
    assert out[1].item() == pytest.approx(math.log(0.2 / (V - 3)))
    # a padding entry on the label is not a kept token: the spread over V - 2 real unkept tokens
    assert out[2].item() == pytest.approx(math.log(0.1 / (V - 2)), rel=1e-5)
    assert out[3].item() == NEG  # nothing outside the kept tokens: probability zero


def test_mixed_rows_score_only_the_labelled_ones() -> None:
    t = _targets()
    out = label_log_prob(t, torch.tensor([1, -100, 8, -100]), V)
    want = torch.tensor([math.log(0.5), 0.0, math.log(0.3), 0.0])
    torch.testing.assert_close(out, want)


def test_label_aware_weights_fall_back_to_the_base_weights_on_ignored_rows() -> None:
    t = _targets()
    other = SparseTargets(t.indices.flip(0), t.logp.flip(0), t.tail.flip(0))
    agg = build_aggregator("label_aware", num_teachers=2, vocab_size=V, base_weights=[0.25, 0.75])
    assert isinstance(agg, LabelAwareAggregator)
    labels = torch.tensor([-100, 2, -100, 1])
    w = agg.weights([t, other], AggregationContext(labels=labels))  # (4, 2)
    torch.testing.assert_close(w[0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(w[2], torch.tensor([0.25, 0.75]))
    assert not torch.allclose(w[1], torch.tensor([0.25, 0.75]))
