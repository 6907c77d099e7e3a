"""Edges of `mtkd_train.targets` that the mutation run (docs/TESTING.md) showed untested: batched
(B, T, K) targets, float counts, index dtypes, and each rule of `check_targets` on its own.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.targets import (
    SparseTargets,
    TargetsError,
    check_targets,
    from_samples,
    renormalize,
    retemper,
    to_dense,
)

INF = math.inf


def _batched(seed: int = 0) -> SparseTargets:
    """(B=2, T=3, K=4) top-4 targets of random 9-token distributions, row 1 of batch 0 padded."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(2, 3, 9, generator=g) * 2, dim=-1)
    top, idx = probs.topk(4, dim=-1)
    logp = top.log()
    logp[0, 1, 2:] = -INF
    tail = 1 - logp.exp().sum(-1)
    return SparseTargets(idx, logp, tail)


def test_from_samples_on_batched_rows() -> None:
    indices = torch.tensor([[[3, 1, 4], [2, 7, 0]], [[5, 6, 8], [1, 2, 3]]])  # (2, 2, 3)
    counts = torch.tensor([[[2, 1, 1], [0, 3, 1]], [[4, 0, 0], [1, 1, 2]]])
    t = from_samples(indices.to(torch.int32), counts)
    assert t.indices.dtype == torch.int64 and t.logp.shape == (2, 2, 3) and t.tail.shape == (2, 2)
    want = torch.where(counts > 0, (counts / counts.sum(-1, keepdim=True)).log(), -INF)
    torch.testing.assert_close(t.logp, want.float())
    assert torch.equal(t.tail, torch.zeros(2, 2))


def test_from_samples_with_fractional_counts_normalises_by_their_sum() -> None:
    t = from_samples(torch.tensor([[0, 1]]), torch.tensor([[0.25, 0.125]]))
    torch.testing.assert_close(t.logp.exp(), torch.tensor([[2 / 3, 1 / 3]]))


def test_from_samples_error_message_is_exact() -> None:
    with pytest.raises(TargetsError, match=r"^counts must be non-negative; found a negative count$"):
        from_samples(torch.tensor([[0, 1]]), torch.tensor([[1, -1]]))


def test_renormalize_batched_rows_sum_to_one() -> None:
    t = _batched()
    noisy = SparseTargets(t.indices, t.logp + 0.05, t.tail)  # codes off by a little
    r = renormalize(noisy)
    assert r.logp.shape == (2, 3, 4) and r.tail.shape == (2, 3)
    torch.testing.assert_close(r.logp.exp().sum(-1) + r.tail, torch.ones(2, 3))
    ratios = r.logp[..., :1] - r.logp  # kept ratios do not change
    torch.testing.assert_close(ratios, noisy.logp[..., :1] - noisy.logp)


def test_check_targets_accepts_valid_batched_targets_with_padding_and_zero_tail() -> None:
    t = _batched()
    check_targets(t, vocab_size=9)
    zero_tail = SparseTargets(t.indices, t.logp, torch.zeros_like(t.tail))
    check_targets(zero_tail, vocab_size=9)
    # T = 1 and K = 4: padding keys must stay apart from small real token ids
    one = SparseTargets(torch.tensor([[[0, 1, 0, 1]]]), torch.tensor([[[-1.0, -1.0, -INF, -INF]]]),
                        torch.tensor([[0.2]]))  # fmt: skip
    check_targets(one, vocab_size=2)


def test_check_targets_padding_may_sit_next_to_large_ids() -> None:
    t = SparseTargets(torch.tensor([[2, 3, 4, 0]]), torch.tensor([[-1.0, -2.0, -3.0, -INF]]),
                      torch.tensor([0.1]))  # fmt: skip
    check_targets(t, vocab_size=5)


@pytest.mark.parametrize(
    "indices",
    [
        torch.tensor([[[1, 5, 5, 2]]]),  # the repeated token is not the row's smallest
        torch.tensor([[[1, 2, 3, 4]], [[6, 7, 8, 6]]]),  # in the second batch row
    ],
)
def test_check_targets_finds_duplicates_in_batched_rows(indices: torch.Tensor) -> None:
    logp = torch.full(indices.shape, -2.0)
    t = SparseTargets(indices, logp, torch.zeros(indices.shape[:-1]))
    with pytest.raises(TargetsError, match=r"^a row keeps the same token twice; deduplicate indices in the cache$"):
        check_targets(t)


def test_check_targets_rejects_an_index_equal_to_the_vocabulary_size() -> None:
    t = SparseTargets(torch.tensor([[0, 5]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([0.0]))
    check_targets(t, vocab_size=6)
    with pytest.raises(TargetsError, match=r"outside \[0, 5\)"):
        check_targets(t, vocab_size=5)


def test_check_targets_rejects_int32_indices_even_with_float_logp() -> None:
    t = SparseTargets(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[-1.0, -1.0]]), torch.tensor([0.0]))
    with pytest.raises(TargetsError, match=r"^need int64 indices and float logp, got torch.int32, torch.float32$"):
        check_targets(t)


@pytest.mark.parametrize("where", ["logp", "tail"])
def test_check_targets_rejects_nan_in_either_part(where: str) -> None:
    logp, tail = torch.tensor([[-1.0, -2.0]]), torch.tensor([0.1])
    if where == "logp":
        logp[0, 1] = math.nan
    else:
        tail[0] = math.nan
    with pytest.raises(TargetsError, match=r"^logp or tail contains NaN; re-decode the cache rows$"):
        check_targets(SparseTargets(torch.tensor([[0, 1]]), logp, tail))


def test_check_targets_negative_tail_message_is_exact() -> None:
    t = SparseTargets(torch.tensor([[0, 1]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([-0.01]))
    with pytest.raises(TargetsError, match=r"^tail must be >= 0; call renormalize\(\) on decoded targets$"):
        check_targets(t)


def test_to_dense_of_batched_targets_matches_row_by_row() -> None:
    t = _batched()
    dense = to_dense(t, 9)
    assert dense.shape == (2, 3, 9)
    for b in range(2):
        for r in range(3):
            row = SparseTargets(t.indices[b, r][None], t.logp[b, r][None], t.tail[b, r][None])
            torch.testing.assert_close(dense[b, r], to_dense(row, 9)[0])
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_retemper_of_batched_targets_matches_row_by_row(temperature: float) -> None:
    t = _batched(1)
    out = retemper(t, temperature, 9)
    assert out.logp.shape == (2, 3, 4) and out.tail.shape == (2, 3)
    for b in range(2):
        for r in range(3):
            row = SparseTargets(t.indices[b, r][None], t.logp[b, r][None], t.tail[b, r][None])
            one = retemper(row, temperature, 9)
            torch.testing.assert_close(out.logp[b, r], one.logp[0])
            torch.testing.assert_close(out.tail[b, r], one.tail[0])


def test_retemper_leaves_an_empty_row_empty_without_nan() -> None:
    t = SparseTargets(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[-INF, -INF], [-0.5, -1.5]]),
                      torch.tensor([0.0, 0.1]))  # fmt: skip
    out = retemper(t, 2.0, 6)
    assert not torch.isnan(out.logp).any() and not torch.isnan(out.tail).any()
    assert torch.equal(out.logp[0], torch.tensor([-INF, -INF])) and out.tail[0] == 0


def test_to_dense_keeps_double_precision() -> None:
    t = _batched(2)
    t64 = SparseTargets(t.indices, t.logp.double(), t.tail.double())
    for mode in ("spread", "bucket"):
        dense = to_dense(t64, 9, mode)  # type: ignore[arg-type]
        assert dense.dtype == torch.float64
        torch.testing.assert_close(dense, to_dense(t, 9, mode).double(), rtol=1e-6, atol=1e-7)  # type: ignore[arg-type]
