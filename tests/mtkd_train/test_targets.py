"""Tests for mtkd_train.targets: the sparse target type and its reference conversions."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.targets import (
    SparseTargets,
    TargetsError,
    check_targets,
    from_dense,
    from_samples,
    is_empty,
    kept_count,
    parse_tail_mode,
    renormalize,
    retemper,
    spread_log_value,
    to_dense,
)

INF = math.inf


def _random_probs(p: int, v: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(p, v, generator=g) * scale, dim=-1)


def _padded() -> SparseTargets:
    """Row 0 keeps tokens 3 and 1; row 1 keeps token 0 and has padding entries that *also* say
    index 0 (padding may hold any id)."""
    return SparseTargets(
        torch.tensor([[3, 1, 0], [0, 0, 2]]),
        torch.tensor([[math.log(0.5), math.log(0.2), -INF], [math.log(0.6), -INF, -INF]]),
        torch.tensor([0.3, 0.4]),
    )


def test_from_dense_keeps_top_k_and_exact_tail() -> None:
    probs = _random_probs(3, 10)
    t = from_dense(probs, 4)
    assert t.indices.shape == (3, 4)
    top = probs.topk(4, dim=-1)
    torch.testing.assert_close(t.logp.exp(), top.values)
    torch.testing.assert_close(t.tail, 1 - top.values.sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(to_dense(from_dense(probs, 10), 10), probs)


def test_to_dense_spread_fills_unkept_tokens_uniformly_and_ignores_padding() -> None:
    dense = to_dense(_padded(), 5, "spread")
    # row 0: kept {3: .5, 1: .2}, tail .3 over the 3 other tokens
    torch.testing.assert_close(dense[0], torch.tensor([0.1, 0.2, 0.1, 0.5, 0.1]))
    # row 1: kept {0: .6}; the padding entries (one pointing at token 0) add nothing
    torch.testing.assert_close(dense[1], torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]))


def test_to_dense_bucket_puts_tail_in_last_column() -> None:
    dense = to_dense(_padded(), 5, "bucket")
    assert dense.shape == (2, 6)
    torch.testing.assert_close(dense[0], torch.tensor([0.0, 0.2, 0.0, 0.5, 0.0, 0.3]))
    torch.testing.assert_close(dense[1], torch.tensor([0.6, 0.0, 0.0, 0.0, 0.0, 0.4]))


def test_kept_count_spread_value_and_is_empty() -> None:
    t = _padded()
    assert kept_count(t).tolist() == [2, 1]
    torch.testing.assert_close(spread_log_value(t, 5).exp(), torch.tensor([0.1, 0.1]))
    full = from_dense(_random_probs(1, 4), 4)
    assert spread_log_value(full, 4).item() == -INF  # nothing is unkept
    empty = SparseTargets(
        torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), -INF), torch.tensor([0.0, 1.0])
    )
    assert is_empty(empty).tolist() == [True, False]


def test_from_samples_gives_frequencies_and_zero_tail() -> None:
    t = from_samples(torch.tensor([[4, 7, 1]]), torch.tensor([[3, 1, 0]]))
    torch.testing.assert_close(t.logp[0, :2].exp(), torch.tensor([0.75, 0.25]))
    assert t.logp[0, 2].item() == -INF
    assert t.tail.tolist() == [0.0]
    # under the spread reading a zero tail gives unsampled tokens probability zero
    assert to_dense(t, 8)[0].tolist() == [0, 0, 0, 0, 0.75, 0, 0, 0.25]


@pytest.mark.parametrize(
    ("indices", "counts", "match"),
    [
        (torch.tensor([[1, 2]]), torch.tensor([[1, -1]]), "non-negative"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]), "same shape"),
    ],
)
def test_from_samples_rejects_bad_counts(
    indices: torch.Tensor, counts: torch.Tensor, match: str
) -> None:
    with pytest.raises(TargetsError, match=match):
        from_samples(indices, counts)


def test_renormalize_fixes_quantisation_error_and_keeps_ratios() -> None:
    t = from_dense(_random_probs(4, 12, seed=1), 5)
    noisy = SparseTargets(t.indices, t.logp + 0.03, t.tail * 0.9)  # codes off by a few percent
    fixed = renormalize(noisy)
    total = fixed.logp.exp().sum(-1) + fixed.tail
    torch.testing.assert_close(total, torch.ones(4), atol=1e-6, rtol=0)
    ratio = fixed.logp - fixed.logp[:, :1]
    torch.testing.assert_close(ratio, noisy.logp - noisy.logp[:, :1])


def test_renormalize_clamps_negative_tail_and_leaves_empty_rows() -> None:
    t = SparseTargets(
        torch.tensor([[0, 1], [0, 1]]),
        torch.tensor([[math.log(0.7), math.log(0.31)], [-INF, -INF]]),
        torch.tensor([-0.01, 0.0]),
    )
    fixed = renormalize(t)
    assert fixed.tail[0].item() == 0.0
    torch.testing.assert_close(fixed.logp[0].exp().sum(), torch.tensor(1.0))
    assert fixed.logp[1].tolist() == [-INF, -INF] and fixed.tail[1].item() == 0.0


@pytest.mark.parametrize("temperature", [0.5, 2.0, 7.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_retemper_matches_dense_reference(temperature: float, k: int) -> None:
    v = 6
    t = from_dense(_random_probs(3, v, seed=2), k)
    dense = to_dense(t, v).double()
    expected = dense.pow(1 / temperature)
    expected = expected / expected.sum(-1, keepdim=True)
    got = to_dense(retemper(t, temperature, v), v).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_retemper_identity_at_one_and_zero_stays_zero() -> None:
    t = from_samples(torch.tensor([[0, 3]]), torch.tensor([[1, 3]]))
    assert retemper(t, 1.0, 5) is t
    hot = retemper(t, 3.0, 5)
    assert hot.tail.item() == 0.0  # zero-probability tokens stay impossible
    expected = torch.tensor([1.0, 3.0]).pow(1 / 3)
    torch.testing.assert_close(hot.logp[0].exp(), expected / expected.sum())


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_retemper_rejects_bad_temperature(bad: float) -> None:
    with pytest.raises(TargetsError, match="temperature"):
        retemper(_padded(), bad, 5)


def test_check_targets_accepts_padding_that_repeats_an_index() -> None:
    check_targets(_padded(), vocab_size=5)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (
            SparseTargets(
                torch.tensor([[1, 1]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([0.2])
            ),
            "twice",
        ),
        (
            SparseTargets(
                torch.tensor([[1, 9]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([0.2])
            ),
            "outside",
        ),
        (
            SparseTargets(
                torch.tensor([[1, 2]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([-0.2])
            ),
            "tail",
        ),
        (
            SparseTargets(
                torch.tensor([[1, 2]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([0.2, 0.1])
            ),
            "shapes",
        ),
    ],
)
def test_check_targets_rejects_malformed(targets: SparseTargets, match: str) -> None:
    with pytest.raises(TargetsError, match=match):
        check_targets(targets, vocab_size=5)


def test_parse_tail_mode() -> None:
    assert parse_tail_mode("bucket") == "bucket"
    with pytest.raises(TargetsError, match="spread"):
        parse_tail_mode("uniform")
