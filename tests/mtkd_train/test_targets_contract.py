"""`mtkd_train.targets` held to its docstrings at the edges a mutation run found unchecked
(docs/TESTING.md): the vocabulary-size and `k` rules and their exact errors, padding whose id is
out of range, one unkept token, a whole vocabulary kept, zero-probability tokens of `from_dense`,
`(B, T, V)` inputs, float32 outputs, and results that stay on the targets' device.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.targets import (
    SparseTargets,
    TargetsError,
    from_dense,
    renormalize,
    retemper,
    spread_log_value,
    to_dense,
)

NEG = -math.inf


def _row(logp: list[float], indices: list[int], tail: float, dtype: torch.dtype = torch.float32) -> SparseTargets:
    return SparseTargets(torch.tensor([indices]), torch.tensor([logp], dtype=dtype), torch.tensor([tail], dtype=dtype))


@pytest.mark.parametrize("bad", [0, -4, 6.0, "6", None, True])
def test_vocab_size_must_be_a_positive_int_with_the_exact_message(bad: object) -> None:
    t = _row([math.log(0.5)], [1], 0.5)
    for call in (lambda: spread_log_value(t, bad), lambda: to_dense(t, bad), lambda: retemper(t, 2.0, bad)):  # type: ignore[arg-type]
        with pytest.raises(TargetsError) as err:
            call()
        assert str(err.value) == f"vocab_size must be a positive int, got {bad!r}"


def test_k_true_is_refused_not_read_as_one() -> None:
    with pytest.raises(TargetsError, match="k must be an int in"):
        from_dense(torch.tensor([[0.5, 0.5]]), True)  # type: ignore[arg-type]


def test_a_one_token_vocabulary_is_allowed() -> None:
    kept = _row([0.0], [0], 0.0)
    assert spread_log_value(kept, 1).item() == NEG  # nothing left to spread over
    torch.testing.assert_close(to_dense(kept, 1), torch.tensor([[1.0]]))
    tail_only = _row([NEG], [0], 1.0)
    assert spread_log_value(tail_only, 1).item() == 0.0
    torch.testing.assert_close(to_dense(tail_only, 1), torch.tensor([[1.0]]))


def test_spread_value_when_one_token_is_left_is_the_whole_tail() -> None:
    t = _row([math.log(0.5), math.log(0.2), math.log(0.2)], [0, 1, 3], 0.1)
    torch.testing.assert_close(spread_log_value(t, 4), torch.tensor([math.log(0.1)]))
    torch.testing.assert_close(to_dense(t, 4), torch.tensor([[0.5, 0.2, 0.1, 0.2]]))


def test_a_row_that_kept_the_whole_vocabulary_spreads_nothing_even_with_a_rounding_tail() -> None:
    t = _row([math.log(0.5), math.log(0.49)], [1, 0], 0.01)
    assert spread_log_value(t, 2).item() == NEG
    torch.testing.assert_close(to_dense(t, 2), torch.tensor([[0.49, 0.5]]))


def test_spread_value_in_double_precision_counts_unkept_tokens_exactly() -> None:
    t = _row([math.log(0.5), NEG], [2, 9], 0.5, dtype=torch.float64)
    got = spread_log_value(t, 8)  # 7 unkept tokens: the padding entry keeps nothing
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([math.log(0.5) - math.log(7)], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad_id", [-1, -100, 6, 1000])
def test_padding_may_hold_any_id_even_outside_the_vocabulary(pad_id: int) -> None:
    t = _row([math.log(0.6), NEG, math.log(0.3)], [4, pad_id, 1], 0.1)
    want = torch.tensor([[0.025, 0.3, 0.025, 0.025, 0.6, 0.025]])
    torch.testing.assert_close(to_dense(t, 6), want)
    bucket = to_dense(t, 6, "bucket")
    torch.testing.assert_close(bucket, torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.6, 0.0, 0.1]]))


def test_retemper_with_one_unkept_token_matches_the_dense_definition() -> None:
    t = _row([math.log(0.5), math.log(0.3), math.log(0.15)], [0, 1, 2], 0.05)
    v, temp = 4, 0.5
    dense = to_dense(t, v) ** (1 / temp)
    want = dense / dense.sum(-1, keepdim=True)
    torch.testing.assert_close(to_dense(retemper(t, temp, v), v), want)
    assert retemper(t, temp, v).tail.item() == pytest.approx(want[0, 3].item(), rel=1e-5)


def test_renormalize_keeps_the_indices() -> None:
    t = _row([math.log(0.4), math.log(0.4)], [5, 2], 0.1)
    out = renormalize(t)
    assert torch.equal(out.indices, t.indices)
    torch.testing.assert_close(out.logp.exp().sum(-1) + out.tail, torch.tensor([1.0]))


@pytest.mark.parametrize("k", [0, -1, 6, 2.0, None])
def test_from_dense_refuses_k_outside_one_to_v_with_the_exact_message(k: object) -> None:
    probs = torch.softmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(TargetsError) as err:
        from_dense(probs, k)  # type: ignore[arg-type]
    assert str(err.value) == f"k must be an int in [1, 5], got {k!r}"


def test_from_dense_of_batched_distributions_matches_row_by_row() -> None:
    probs = torch.softmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1)) * 2, -1)
    t = from_dense(probs, 4)  # k above the batch sizes 2 and 3: only the last axis is the vocabulary
    assert t.indices.shape == (2, 3, 4) and t.tail.shape == (2, 3)
    for b in range(2):
        row = from_dense(probs[b], 4)
        assert torch.equal(t.indices[b], row.indices)
        torch.testing.assert_close(t.logp[b], row.logp)
        torch.testing.assert_close(t.tail[b], row.tail)
    kept = probs.gather(-1, t.indices)
    torch.testing.assert_close(t.logp, kept.log())
    torch.testing.assert_close(t.tail, 1 - kept.sum(-1))


def test_from_dense_makes_kept_zero_probability_tokens_padding() -> None:
    probs = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0]])
    t = from_dense(probs, 3)
    assert (t.logp == NEG).sum(-1).tolist() == [1, 2]  # exactly the zeros: not log(1e-45), not +inf
    assert torch.isfinite(t.logp[t.logp > NEG]).all()
    torch.testing.assert_close(to_dense(t, 4), probs)


def test_from_dense_returns_float32_for_double_input() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)
    t = from_dense(probs, 2)
    assert t.logp.dtype == torch.float32 and t.tail.dtype == torch.float32
    assert t.indices.dtype == torch.int64


def test_to_dense_stays_on_the_device_of_the_targets() -> None:
    """The meta device stands in for a GPU: a buffer made on the CPU cannot take its values."""
    t = SparseTargets(torch.tensor([[3, 0, 7]], device="meta"), torch.empty(1, 3, device="meta"),
                      torch.empty(1, device="meta"))
    for mode in ("spread", "bucket"):
        out = to_dense(t, 8, mode)  # type: ignore[arg-type]
        assert out.device.type == "meta" and out.shape == (1, 8 + (mode == "bucket"))
