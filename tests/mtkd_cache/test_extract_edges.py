"""Edges of `mtkd_cache.precompute.extract` that the mutation run (docs/TESTING.md) showed
untested: `distribution_stats` on its own, one draw per row, the pooling and int8 contracts.
"""

from __future__ import annotations

import re

import pytest
import torch

from mtkd_cache.precompute.extract import (
    dequantize_int8_rows,
    distribution_stats,
    pool_features,
    quantize_int8_rows,
    sample_targets,
)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distribution_stats_match_the_real_vocabulary_softmax(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, generator=g) * 3
    logits[..., 10:] = 50.0  # padding columns past the real vocabulary of 10
    entropy, top1 = distribution_stats(logits.to(torch.bfloat16), temperature, vocab_size=10)
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
