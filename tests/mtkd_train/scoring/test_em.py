"""EM mixture weights recover planted weights; the likelihood never decreases."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.scoring import fit_mixture_em, mixture_log_likelihood


def _planted(weights: torch.Tensor, p: int, v: int = 12, seed: int = 0) -> torch.Tensor:
    """(P, N) log p_i(y) where y ~ sum_i w_i p_i at each position (p_i random per position)."""
    g = torch.Generator().manual_seed(seed)
    n = weights.shape[-1]
    probs = torch.softmax(2.0 * torch.randn(p, n, v, generator=g), dim=-1)  # (P, N, V)
    w = weights if weights.dim() == 2 else weights.expand(p, n)
    mix = (w.unsqueeze(-1) * probs).sum(1)  # (P, V)
    y = torch.multinomial(mix, 1, generator=g).squeeze(1)  # (P,)
    return probs.gather(2, y.view(p, 1, 1).expand(p, n, 1)).squeeze(-1).log()


def test_em_recovers_planted_global_weights() -> None:
    truth = torch.tensor([0.6, 0.3, 0.1])
    res = fit_mixture_em(_planted(truth, 20_000))
    assert res.weights.shape == (1, 3)
    torch.testing.assert_close(res.weights[0], truth, atol=0.03, rtol=0)


def test_em_recovers_per_group_weights() -> None:
    truth = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    groups = torch.arange(16_000) % 2
    res = fit_mixture_em(_planted(truth[groups], 16_000, seed=1), groups)
    torch.testing.assert_close(res.weights, truth, atol=0.04, rtol=0)


def test_em_increases_likelihood_over_uniform_and_is_stationary() -> None:
    lp = _planted(torch.tensor([0.8, 0.2]), 4000, seed=2)
    res = fit_mixture_em(lp)
    uniform = mixture_log_likelihood(lp, torch.full((1, 2), 0.5)).mean()
    assert res.mean_log_likelihood > float(uniform)
    # a nearby weight vector is no better (the optimum of a concave objective)
    for d in (-0.02, 0.02):
        w = res.weights.double() + torch.tensor([[d, -d]])
        assert float(mixture_log_likelihood(lp, w).mean()) <= res.mean_log_likelihood + 1e-9


def test_em_skips_positions_no_teacher_explains() -> None:
    lp = torch.tensor([[-1.0, -2.0], [-float("inf"), -float("inf")], [-1.5, -0.5]])
    res = fit_mixture_em(lp)
    assert torch.isfinite(res.weights).all() and abs(float(res.weights.sum()) - 1) < 1e-6


def test_em_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(P, N\)"):
        fit_mixture_em(torch.zeros(3))
    with pytest.raises(ValueError, match="groups"):
        fit_mixture_em(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
