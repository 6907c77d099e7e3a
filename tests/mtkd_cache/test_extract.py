"""Tests for mtkd_cache.precompute.extract: top-k and sampled targets, finiteness, pooling, int8 rows."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_cache.precompute.extract import (
    NonFiniteLogitsError,
    TopKTooLargeError,
    check_finite,
    dequantize_int8_rows,
    nonfinite_samples,
    pool_features,
    quantize_int8_rows,
    sample_targets,
    topk_targets,
)

pytestmark = pytest.mark.usefixtures("topk_kernel")  # every test: compiled kernel and torch path


def _logits(*shape: int, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * spread


# --- topk_targets ------------------------------------------------------------------------------


def test_topk_matches_reference_topk_of_log_softmax() -> None:
    logits = _logits(2, 5, 50)
    indices, logp, tail = topk_targets(logits, k=7, temperature=2.0)

    reference = torch.log_softmax(logits / 2.0, dim=-1)
    ref_logp, ref_idx = reference.topk(7, dim=-1)
    assert indices.dtype == torch.int64 and logp.dtype == torch.float32
    assert indices.shape == logp.shape == (2, 5, 7) and tail.shape == (2, 5)
    assert torch.equal(indices, ref_idx.sort(dim=-1).values)
    assert (indices[..., 1:] > indices[..., :-1]).all(), "indices must be sorted ascending"
    # logp is permuted together with the indices, not left in topk order.
    torch.testing.assert_close(logp, reference.gather(-1, indices), rtol=0, atol=1e-6)
    torch.testing.assert_close(logp.sort(dim=-1).values, ref_logp.sort(dim=-1).values)


def test_topk_tail_is_one_minus_kept_mass_and_non_negative() -> None:
    logits = _logits(3, 4, 40, seed=1)
    _, logp, tail = topk_targets(logits, k=5, temperature=1.5)

    kept = logp.double().exp().sum(dim=-1)
    torch.testing.assert_close(tail.double(), 1.0 - kept, rtol=0, atol=1e-6)
    assert (tail >= 0).all() and (tail <= 1).all()


def test_topk_tail_keeps_precision_when_tiny() -> None:
    # One token holds almost all the mass: 1 - sum(p_topk) in float32 rounds to 0 or below.
    logits = torch.zeros(1, 2, 30)
    logits[..., 0] = 25.0
    _, _, tail = topk_targets(logits, k=3)

    probs = torch.softmax(logits.double(), dim=-1)
    exact = probs[..., 3:].sum(dim=-1)  # the three kept are 0 and two of the equal rest
    assert (tail > 0).all()
    torch.testing.assert_close(tail.double(), exact, rtol=1e-4, atol=0)


def test_topk_ignores_padded_vocab_columns() -> None:
    logits = _logits(2, 3, 60, seed=2)
    logits[..., 50:] = 100.0  # padded head columns would win every top-k if not sliced off
    indices, logp, tail = topk_targets(logits, k=4, vocab_size=50)

    assert int(indices.max()) < 50
    ref_indices, ref_logp, ref_tail = topk_targets(logits[..., :50].clone(), k=4)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(tail, ref_tail)


def test_topk_does_not_modify_float32_input() -> None:
    logits = _logits(1, 2, 20, seed=3)
    before = logits.clone()
    topk_targets(logits, k=3)
    assert torch.equal(logits, before)


def test_topk_k_larger_than_vocab_raises() -> None:
    with pytest.raises(TopKTooLargeError, match=r"k=51.*50 tokens") as info:
        topk_targets(_logits(1, 1, 60), k=51, vocab_size=50)
    assert isinstance(info.value, ValueError)


def test_topk_k_equal_to_vocab_has_zero_tail() -> None:
    _, logp, tail = topk_targets(_logits(1, 2, 10), k=10)
    assert torch.equal(tail, torch.zeros(1, 2))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(1, 2))


def test_topk_wide_vocab_preserves_indices_above_uint16() -> None:
    vocab = 140_000
    logits = _logits(1, 3, vocab, seed=4, spread=1.0)
    winners = torch.tensor([65_536, 70_000, 139_999])
    logits[..., winners] = 40.0
    indices, logp, _ = topk_targets(logits, k=4, temperature=1.0)

    assert indices.dtype == torch.int64
    for row, row_logp in zip(indices.reshape(3, 4), logp.reshape(3, 4), strict=True):
        kept = torch.isin(row, winners)
        assert int(kept.sum()) == 3  # all three wide ids survive, plus one other token
        torch.testing.assert_close(
            row_logp[kept], torch.full((3,), -math.log(3)), atol=1e-4, rtol=0
        )
    assert int(indices.max()) == 139_999


def test_topk_bfloat16_logits_give_float32_targets() -> None:
    logits = _logits(1, 2, 32).to(torch.bfloat16)
    indices, logp, _ = topk_targets(logits, k=3)
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, indices)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, reference)


# --- sample_targets ----------------------------------------------------------------------------


def test_sample_counts_sum_to_draws_and_rows_are_sorted() -> None:
    logits = _logits(3, 7, 25, seed=5, spread=1.0)
    indices, counts = sample_targets(logits, 16, 1.0, torch.Generator().manual_seed(0))

    assert indices.shape == counts.shape == (3, 7, 16)
    assert indices.dtype == torch.int64 and counts.dtype == torch.int32
    assert (counts.sum(dim=-1) == 16).all()
    assert (indices[..., 1:] >= indices[..., :-1]).all()
    used = counts > 0
    # Used slots form a prefix, and the tokens in it are distinct.
    assert (used[..., :-1] | ~used[..., 1:]).all()
    strictly_up = indices[..., 1:] > indices[..., :-1]
    assert (strictly_up | ~used[..., 1:]).all()


def test_sample_frequencies_match_softmax_within_five_sigma() -> None:
    vocab, rows, n_draws, temperature = 8, 4000, 16, 1.5
    row = torch.linspace(-2.0, 2.0, vocab)
    logits = row.expand(40, 100, vocab).contiguous()
    indices, counts = sample_targets(logits, n_draws, temperature, torch.Generator().manual_seed(1))

    totals = torch.zeros(rows, vocab, dtype=torch.float64)
    totals.scatter_add_(1, indices.reshape(rows, -1), counts.reshape(rows, -1).double())
    estimate = totals.sum(dim=0) / (rows * n_draws)
    expected = torch.softmax(row.double() / temperature, dim=-1)
    # Each token's total count is Binomial(rows * n_draws, p).
    sigma = torch.sqrt(expected * (1 - expected) / (rows * n_draws))
    assert (estimate - expected).abs().max() <= (5 * sigma).max()
    assert ((estimate - expected).abs() <= 5 * sigma).all()


def test_sample_is_deterministic_given_generator() -> None:
    logits = _logits(2, 5, 30, seed=6, spread=1.0)
    first = sample_targets(logits, 8, 1.0, torch.Generator().manual_seed(7))
    again = sample_targets(logits, 8, 1.0, torch.Generator().manual_seed(7))
    other = sample_targets(logits, 8, 1.0, torch.Generator().manual_seed(8))

    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not (torch.equal(first[0], other[0]) and torch.equal(first[1], other[1]))


def test_sample_never_draws_padded_columns() -> None:
    logits = torch.zeros(2, 4, 20)
    logits[..., 12:] = 50.0
    indices, counts = sample_targets(logits, 32, 1.0, torch.Generator().manual_seed(0), 12)
    assert int(indices.max()) < 12
    assert (counts.sum(-1) == 32).all()


# --- check_finite ------------------------------------------------------------------------------


def test_check_finite_names_the_bad_sample_ids() -> None:
    logits = _logits(4, 3, 10)
    logits[1, 2, 5] = float("nan")
    logits[3, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"\[11, 13\]") as info:
        check_finite(logits, [10, 11, 12, 13])
    assert isinstance(info.value, ValueError)
    assert "10," not in str(info.value) and "12" not in str(info.value)


def test_check_finite_passes_clean_logits_and_ignores_masked_positions() -> None:
    logits = _logits(2, 3, 10)
    check_finite(logits, [0, 1])
    logits[0, 2] = float("nan")
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    check_finite(logits, [0, 1], mask=mask)
    with pytest.raises(NonFiniteLogitsError, match=r"\[0\]"):
        check_finite(logits, [0, 1])


# --- pool_features -----------------------------------------------------------------------------


def test_pool_mean_averages_real_tokens_only() -> None:
    hidden = _logits(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = pool_features(hidden, mask, "mean")

    assert pooled.shape == (2, 6) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(dim=0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(dim=0))
    assert pool_features(hidden, mask, "none") is hidden
    with pytest.raises(ValueError, match="'max'"):
        pool_features(hidden, mask, "max")  # type: ignore[arg-type]


# --- int8 rows ---------------------------------------------------------------------------------


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    x = _logits(5, 7, 33) * torch.logspace(-3, 3, 7).reshape(1, 7, 1)
    x[0, 0] = 0.0
    q, scale = quantize_int8_rows(x)
    restored = dequantize_int8_rows(q, scale)

    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (5, 7)
    error = (restored - x).abs()
    bound = scale.unsqueeze(-1) / 2
    assert (error <= bound * (1 + 1e-5) + 1e-12).all()
    assert scale[0, 0] == 0 and torch.equal(restored[0, 0], torch.zeros(33))
    # The largest magnitude of each non-zero row uses the full int8 range.
    assert (q.abs().amax(dim=-1)[scale > 0] == 127).all()
    assert math.isclose(float(scale[1, 3]), float(x[1, 3].abs().max()) / 127, rel_tol=1e-6)


def test_nonfinite_samples_ignore_nan_in_the_padded_vocabulary_columns() -> None:
    logits = torch.randn(3, 4, 10)  # (B, T, V_padded), real vocabulary 8
    logits[:, :, 8:] = float("nan")
    logits[1, 2, 3] = float("inf")
    assert nonfinite_samples(logits, vocab_size=8).tolist() == [False, True, False]
    assert nonfinite_samples(logits).tolist() == [True, True, True]
    check_finite(logits[[0, 2]], [10, 12], vocab_size=8)  # no error
    with pytest.raises(NonFiniteLogitsError, match=r"sample ids \[11\]"):
        check_finite(logits, [10, 11, 12], vocab_size=8)


def test_sampled_targets_are_drawn_block_by_block_with_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are softmaxed in blocks (never all (B T, V) in float32); on the CPU the draws equal one block's."""
    from mtkd_cache.precompute import extract

    logits = torch.randn(3, 50, 300, dtype=torch.bfloat16)
    whole = sample_targets(logits, 16, 0.7, torch.Generator().manual_seed(5), vocab_size=290)
    blocks: list[int] = []
    real_softmax = torch.softmax

    def spy(x: torch.Tensor, dim: int) -> torch.Tensor:
        blocks.append(x.shape[0])
        return real_softmax(x, dim=dim)

    monkeypatch.setitem(extract._BLOCK_ELEMENTS, "cpu", 290 * 7)  # 7 rows per block
    monkeypatch.setattr(torch, "softmax", spy)
    blocked = sample_targets(logits, 16, 0.7, torch.Generator().manual_seed(5), vocab_size=290)
    assert max(blocks) == 7 and sum(blocks) == 150
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)
