"""Edges of `mtkd_cache.precompute.extract` that the mutation run (docs/TESTING.md) showed
untested: `distribution_stats` on its own, one draw per row, the pooling and int8 contracts.
"""

from __future__ import annotations

import re

import pytest
import torch

from mtkd_cache.errors import NonFiniteLogitsError, TopKTooLargeError
from mtkd_cache.precompute.extract import (
    check_finite,
    dequantize_int8_rows,
    distribution_stats,
    pool_features,
    quantize_int8_rows,
    sample_targets,
    topk_targets,
    topk_targets_with_stats,
)

pytestmark = pytest.mark.usefixtures("topk_kernel")  # every test: compiled kernel and torch path


@pytest.mark.parametrize("temperature", [None, 1.0, 2.0, 2.5])
def test_distribution_stats_match_the_real_vocabulary_softmax(temperature: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, generator=g) * 3
    logits[..., 10:] = 50.0  # padding columns past the real vocabulary of 10
    half = logits.to(torch.bfloat16)
    if temperature is None:  # the default is 1
        entropy, top1 = distribution_stats(half, vocab_size=10)
        temperature = 1.0
    else:
        entropy, top1 = distribution_stats(half, temperature, vocab_size=10)
    assert entropy.shape == (2, 3) and top1.shape == (2, 3)
    assert entropy.dtype == torch.float32 and top1.dtype == torch.float32
    p = torch.softmax(logits.to(torch.bfloat16).float()[..., :10] / temperature, dim=-1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top1, p.amax(-1), rtol=1e-5, atol=1e-6)


def test_distribution_stats_of_certain_and_uniform_rows() -> None:
    logits = torch.zeros(1, 2, 8)
    logits[0, 0, 3] = 1e4  # certain: entropy 0, top-1 1
    entropy, top1 = distribution_stats(logits)
    torch.testing.assert_close(entropy[0], torch.tensor([0.0, torch.log(torch.tensor(8.0)).item()]))
    torch.testing.assert_close(top1[0], torch.tensor([1.0, 1 / 8]))
    with pytest.raises(ValueError):
        distribution_stats(logits, temperature=0.0)


def test_one_draw_per_row_is_allowed_and_zero_is_refused() -> None:
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(1))
    indices, counts = sample_targets(logits, 1, 1.0, torch.Generator().manual_seed(0))
    assert indices.shape == (1, 4, 1) and torch.equal(counts, torch.ones(1, 4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^n_draws must be >= 1, got 0$"):
        sample_targets(logits, 0, 1.0, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("hidden", "mask"),
    [(torch.zeros(2, 4), torch.ones(2, 4)), (torch.zeros(2, 4, 3), torch.ones(2, 5))],
)
def test_pool_features_names_both_shapes_when_they_do_not_fit(
    hidden: torch.Tensor, mask: torch.Tensor
) -> None:
    want = f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} must be (B, T, D) and (B, T)"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        pool_features(hidden, mask, "mean")


def test_mean_pooling_is_a_float32_mean_over_real_tokens() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 7.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = pool_features(hidden.to(torch.bfloat16), mask, "mean")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [5.0, 7.0]]))  # one real token: itself
    assert torch.equal(pool_features(hidden, torch.zeros(2, 3), "mean"), torch.zeros(2, 2))
    third = torch.tensor([[[1.001, 0.0], [1.002, 0.0], [1.003, 0.0]]]).to(torch.bfloat16)
    mean32 = third.float().mean(1)
    torch.testing.assert_close(pool_features(third, torch.ones(1, 3), "mean"), mean32, rtol=0, atol=1e-6)


def test_int8_scales_are_float32_for_half_inputs_and_round_trip() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, scale = quantize_int8_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q.abs().amax(-1), torch.full((3,), 127, dtype=torch.int8))
    back = dequantize_int8_rows(q, scale)
    assert back.dtype == torch.float32
    assert bool(((back - x.float()).abs() <= scale.unsqueeze(-1) / 2 + 1e-6).all())


def test_check_finite_names_exactly_the_bad_samples() -> None:
    logits = torch.zeros(4, 3, 5)
    logits[1, 2, 4] = float("nan")
    logits[3, 0, 0] = float("-inf")
    with pytest.raises(NonFiniteLogitsError, match=r"sample ids \[11, 13\]"):
        check_finite(logits, [10, 11, 12, 13])
    check_finite(logits[[0, 2]], [10, 12])  # the good ones pass


def test_check_finite_accepts_huge_finite_logits_whose_sum_overflows() -> None:
    big = torch.full((2, 3, 4), 3e38)  # finite, but a float32 row sum is inf
    check_finite(big, torch.tensor([5, 6]))
    half = torch.full((2, 8), 60000.0, dtype=torch.float16)
    check_finite(half, [0, 1])
    big[1, 1, 2] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"sample ids \[6\]"):
        check_finite(big, torch.tensor([5, 6]))


def test_check_finite_ignores_padding_and_checks_its_arguments() -> None:
    logits = torch.zeros(2, 3, 4)
    logits[0, 2] = float("nan")  # a padding position of sample 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    check_finite(logits, [0, 1], mask=mask)
    with pytest.raises(NonFiniteLogitsError, match=r"\[0\]"):
        check_finite(logits, [0, 1])
    with pytest.raises(ValueError, match=r"^sample_ids has 3 ids for a batch of 2 samples$"):
        check_finite(logits, [0, 1, 2])
    want = "mask of shape (2, 4) does not match logits (2, 3, 4); expected (B, T) for (B, T, V) logits"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        check_finite(logits, [0, 1], mask=torch.ones(2, 4))
    want = "mask of shape (2,) does not match logits (2, 4); expected (B, T) for (B, T, V) logits"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        check_finite(torch.zeros(2, 4), [0, 1], mask=torch.ones(2))


@pytest.mark.parametrize("fn", [topk_targets, topk_targets_with_stats])
def test_top_1_is_allowed_and_k_above_the_real_vocabulary_is_refused(fn) -> None:  # noqa: ANN001
    logits = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(5))
    logits[..., 6:] = 100.0  # padding columns
    out = fn(logits, 1, 1.0, vocab_size=6)
    assert out[0].shape == (1, 2, 1) and bool((out[0] < 6).all())
    p = torch.softmax(logits[..., :6], -1)
    torch.testing.assert_close(out[2], 1 - p.amax(-1), rtol=1e-5, atol=1e-6)
    want = "k=7 top-k entries were requested but the vocabulary has 6 tokens; pass a top-k between 1 and 6"
    with pytest.raises(TopKTooLargeError, match=f"^{re.escape(want)}$"):
        fn(logits, 7, 1.0, vocab_size=6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_of_zero_or_below_is_refused_by_every_extractor(temperature: float) -> None:
    logits = torch.zeros(1, 2, 4)
    want = f"^temperature must be > 0, got {temperature}$"
    for call in (lambda: topk_targets(logits, 2, temperature), lambda: distribution_stats(logits, temperature),
                 lambda: sample_targets(logits, 2, temperature, torch.Generator())):  # fmt: skip
        with pytest.raises(ValueError, match=want):
            call()


def test_two_dimensional_logits_are_refused_with_the_fix() -> None:
    want = ("logits must have shape (batch, positions, vocab), got (2, 5); classifier outputs (B, V) "
            "need a position axis: logits.unsqueeze(1)")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        topk_targets(torch.zeros(2, 5), 2)


def test_stats_cover_every_row_when_there_are_more_rows_than_tokens() -> None:
    logits = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(6)) * 3  # 32 rows, V = 3
    p = torch.softmax(logits, -1)
    entropy, top1 = distribution_stats(logits)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top1, p.amax(-1))
    _, _, _, entropy2, top1_2 = topk_targets_with_stats(logits, 2)
    torch.testing.assert_close(entropy2, entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top1_2, top1)  # per row, not the block's maximum


def test_a_real_vocabulary_of_one_token_and_the_too_wide_error() -> None:
    indices, logp, tail = topk_targets(torch.randn(1, 2, 4), 1, vocab_size=1)
    assert torch.equal(indices, torch.zeros(1, 2, 1, dtype=torch.int64)) and torch.equal(tail, torch.zeros(1, 2))
    want = ("vocab_size=5 must be between 1 and the logits width 4; pass the tokenizer's vocabulary size, "
            "not a larger number")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        topk_targets(torch.randn(1, 2, 4), 1, vocab_size=5)


def test_non_finite_error_says_how_to_fix_it() -> None:
    want = ("the teacher produced NaN/inf logits for sample ids [7]; this usually means fp16 overflow "
            "(re-run with --dtype bf16 or --dtype fp32 plus --overwrite: the dtype is a stored setting, so "
            "the teacher is recomputed) or broken inputs for those samples")  # fmt: skip
    with pytest.raises(NonFiniteLogitsError, match=f"^{re.escape(want)}$"):
        check_finite(torch.full((1, 2), float("nan")), [7])


@pytest.mark.parametrize("vocab", [49_152, 49_152 + 37, 8 * 64 * 16])
def test_staged_topk_keeps_exactly_the_top_k(vocab: int) -> None:
    """`_topk_rows` ranks group and subgroup maxima first; it must keep the same entries as torch.topk."""
    from mtkd_cache.precompute.extract import _topk_rows

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g) * 3
    x[0, -5:] += 40.0  # the winners in the partial last group
    x[1, :64] += 40.0  # all winners in one group
    x[2, ::700] += 40.0  # one winner per group
    width = vocab // 64  # the first stage's groups are strided: group j holds columns j, j + width, ...
    x[3, 5::width] += 40.0  # all winners in one group
    x[4, 7 + 8 * width: 7 + 16 * width: width] += 40.0  # eight winners, consecutive members of one group
    x[5, :] = 0.0  # ties everywhere: any k columns of value 0 are right
    x[6, 3] = 50.0  # a single winner, the rest of the top-k among ties below it
    x[6, 4:] = -1.0
    for k in (1, 16, 64):
        values, idx = _topk_rows(x, k)
        ref_values, ref_idx = torch.topk(x, k, dim=-1)
        exact = [0, 1, 2, 3, 4, 7, 8]  # rows without ties at the k-th value
        assert torch.equal(idx[exact].sort(dim=-1).values, ref_idx[exact].sort(dim=-1).values)
        assert torch.equal(values.sort(dim=-1).values, ref_values.sort(dim=-1).values)
        assert torch.equal(x.gather(1, idx), values)
        assert all(len(set(row)) == k for row in idx.tolist())  # k distinct columns per row


def test_staged_topk_matches_torch_topk_on_peaked_rows() -> None:
    """Rows shaped like a language model's (a few large logits over a heavy tail) at every k."""
    from mtkd_cache.precompute.extract import _topk_rows

    g = torch.Generator().manual_seed(11)
    x = -torch.log(-torch.log(torch.rand(64, 49_152 + 37, generator=g)))  # Gumbel noise
    x += torch.randn(64, 1, generator=g) * 5 * (torch.rand(64, 49_152 + 37, generator=g) < 0.002)
    for k in (1, 8, 64, 100, 200):
        _, idx = _topk_rows(x, k)
        assert torch.equal(idx.sort(dim=-1).values, torch.topk(x, k, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("padded", [8 * 64 * 2 + 9, 8 * 64 * 9 + 9])  # the entropy's elementwise and per-row dots
def test_the_top_k_pass_checks_finiteness_as_nonfinite_samples_does(temperature: float, padded: int) -> None:
    """`topk_targets_checked` flags the samples `nonfinite_samples` flags, from the top-k pass's own values."""
    from mtkd_cache.precompute.extract import nonfinite_samples, topk_targets_checked

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 5, padded, generator=g) * 4  # (B, T, V_padded), real vocabulary V - 9
    vocab = logits.shape[-1] - 9
    logits[:, :, vocab:] = float("nan")  # padded columns never count
    logits[1, 2, 100] = float("nan")
    logits[2, 0, 7] = float("inf")
    logits[3, 4, vocab - 1] = float("-inf")  # only the entropy sees a lone -inf
    logits[4, 1, :] = float("-inf")
    logits[5, 3, 0], logits[5, 3, 1] = 3e38, -3e38  # finite, but the shifted logits overflow
    logits[6, 4, 9] = float("nan")  # at a padding position
    mask = torch.ones(7, 5, dtype=torch.long)
    mask[6, 4] = 0
    bad, outputs = topk_targets_checked(logits, 16, temperature, vocab, mask=mask)
    want = nonfinite_samples(logits, mask=mask, vocab_size=vocab)
    assert want.tolist() == [False, True, True, True, True, False, False]
    assert torch.equal(bad, want)
    clean = logits[[0, 5, 6]].clone()
    clean[2, 4, 9] = 0.0  # the masked NaN changes its own row only
    _, kept = topk_targets_checked(clean, 16, temperature, vocab)
    for a, b in zip(kept, topk_targets_with_stats(clean, 16, temperature, vocab)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # the overflowed row's entropy is NaN
    assert torch.equal(topk_targets_checked(logits, 16, temperature, vocab)[0], nonfinite_samples(logits, vocab_size=vocab))


def test_the_top_k_pass_refuses_a_mask_of_the_wrong_shape() -> None:
    from mtkd_cache.precompute.extract import topk_targets_checked

    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\) does not match logits \(2, 4, 8\)"):
        topk_targets_checked(torch.zeros(2, 4, 8), 2, mask=torch.ones(2, 3))


@pytest.mark.parametrize("vocab", [1_000, 49_152])  # both ways `_row_dots` takes
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_top_k_pass_matches_a_float64_softmax(vocab: int, temperature: float) -> None:
    """Log-probabilities, tail, entropy and top-1 of the one-pass reduction (the row sum taken as the
    tail plus the kept mass) agree with float64 within float32 rounding, and the tail's relative
    error stays small when the tail is tiny."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 9, vocab, generator=g, dtype=torch.float64) * 3
    logits[0, 0, :64] += 30.0  # the top 64 hold all but ~1e-9 (T = 1) or ~1e-18 of the mass: a tiny tail
    k = 64
    indices, logp, tail, entropy, top1 = topk_targets_with_stats(logits.float(), k, temperature)
    ref = torch.log_softmax(logits.float().double() / temperature, dim=-1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, indices), rtol=0, atol=1e-5)
    ref_tail = ref.exp().scatter(-1, indices, 0.0).sum(-1)
    torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-4, atol=0)
    assert 0 < tail[0, 0] < 1e-8
    torch.testing.assert_close(entropy.double(), -(ref.exp() * ref).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(top1.double(), ref.amax(-1).exp(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_are_tempered_in_float32(dtype: torch.dtype) -> None:
    """Logits / T is taken in float32: in fp16, 100 / 0.001 overflows and bf16 would round the tempered values."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 3, 5_000, generator=g) * 30).to(dtype)  # |x| / 0.001 > 65,504 for most entries
    indices, logp, tail, entropy, _ = topk_targets_with_stats(logits, 8, 0.001)
    ref = torch.log_softmax(logits.double() / 0.001, dim=-1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, indices), rtol=0, atol=1e-3)
    assert torch.isfinite(tail).all() and torch.isfinite(entropy).all()
