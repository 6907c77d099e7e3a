"""The pooling rules at the edges a mutation run found unchecked (docs/TESTING.md): the default
temperature of `log_linear_pool`, a zero-weight teacher with a tail, double precision, and the
dtype of the result when the weights come in another dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import linear_pool, log_linear_pool
from mtkd_train.targets import SparseTargets, from_dense, from_samples, to_dense

V = 9


def _teachers(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in (2, 3, 4):
        t = from_dense(torch.softmax(torch.randn(5, V, generator=g, dtype=torch.float64) * 2, -1), k)
        out.append(SparseTargets(t.indices, t.logp.to(dtype), t.tail.to(dtype)))
    return out


def _geometric(targets: list[SparseTargets], weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dense reference: softmax over V of sum_i (w_i / T) log p_i (spread reading), in float64."""
    logs = torch.stack([to_dense(t, V).double().log() for t in targets], dim=1)  # (P, N, V)
    w = weights.double()[..., None] / temperature
    score = torch.where(w > 0, w * logs, 0.0).sum(1)
    return torch.softmax(score, -1)


def test_log_linear_pool_defaults_to_temperature_one() -> None:
    targets = _teachers()
    w = torch.tensor([0.5, 0.2, 0.3]).expand(5, 3)
    got = to_dense(log_linear_pool(targets, w, vocab_size=V), V)
    torch.testing.assert_close(got, to_dense(log_linear_pool(targets, w, vocab_size=V, temperature=1.0), V))
    torch.testing.assert_close(got.double(), _geometric(targets, w, 1.0), atol=1e-6, rtol=1e-5)


def test_a_zero_weight_teacher_with_a_tail_changes_nothing() -> None:
    targets = _teachers(seed=1)
    assert bool((targets[1].tail > 0).all())
    w = torch.tensor([[0.0, 1.0, 0.0]]).expand(5, 3)
    got = to_dense(log_linear_pool(targets, w, vocab_size=V, temperature=1.0), V)
    torch.testing.assert_close(got, to_dense(targets[1], V), atol=1e-6, rtol=1e-5)
    half = torch.tensor([[0.5, 0.5, 0.0]]).expand(5, 3)
    torch.testing.assert_close(to_dense(log_linear_pool(targets, half, vocab_size=V, temperature=0.7), V).double(),
                               _geometric(targets, half, 0.7), atol=1e-6, rtol=1e-5)


def test_log_linear_pool_in_double_precision_is_exact_to_double_rounding() -> None:
    targets = _teachers(torch.float64, seed=2)
    w = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64).expand(5, 3)
    out = log_linear_pool(targets, w, vocab_size=V, temperature=3.0)
    assert out.logp.dtype == torch.float64 and out.tail.dtype == torch.float64
    torch.testing.assert_close(to_dense(out, V), _geometric(targets, w, 3.0), atol=1e-13, rtol=1e-12)


def test_pools_take_the_targets_dtype_not_the_weights() -> None:
    targets = _teachers()
    w = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64).expand(5, 3)
    for out in (log_linear_pool(targets, w, vocab_size=V, temperature=2.0),
                linear_pool(targets, w, vocab_size=V, tail_mode="spread")):
        assert out.logp.dtype == torch.float32 and out.tail.dtype == torch.float32


@pytest.mark.parametrize("mode", ["spread", "bucket"])
def test_linear_pool_defaults_to_no_smoothing(mode: str) -> None:
    targets = _teachers(seed=3)
    w = torch.tensor([0.2, 0.3, 0.5]).expand(5, 3)
    a = linear_pool(targets, w, vocab_size=V, tail_mode=mode)  # type: ignore[arg-type]
    b = linear_pool(targets, w, vocab_size=V, tail_mode=mode, smoothing=0.0)  # type: ignore[arg-type]
    assert torch.equal(a.logp, b.logp) and torch.equal(a.tail, b.tail)


def test_a_token_held_only_by_a_zero_weight_teacher_is_impossible_with_a_finite_weight_gradient() -> None:
    """`linear_pool` is differentiable in the weights (a gate learns through it), also where the
    mixture is exactly zero: the gradient stays finite (`_safe_log` sends none through a zero)."""
    t0 = from_samples(torch.tensor([[0, 2]]), torch.tensor([[3, 1]]))  # no tail
    t1 = from_samples(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))
    w = torch.tensor([[1.0, 0.0]], requires_grad=True)
    out = linear_pool([t0, t1], w, vocab_size=4, tail_mode="bucket")
    assert out.indices.tolist() == [[0, 1, 2]]
    assert out.logp[0, 1].item() == -math.inf  # token 1: only teacher 1 has it, at weight 0
    log_q = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.5]), -1)
    (out.logp.exp() * log_q[out.indices]).sum().backward()
    assert w.grad is not None
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad[0, 0], 0.75 * log_q[0] + 0.25 * log_q[2])  # d/dw_0 sum_v m(v) log q(v)


def test_smoothed_linear_pool_in_double_precision_is_exact_to_double_rounding() -> None:
    targets = _teachers(torch.float64, seed=4)
    w = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64).expand(5, 3)
    lam = 0.1
    out = linear_pool(targets, w, vocab_size=V, tail_mode="spread", smoothing=lam)
    assert out.logp.dtype == torch.float64 and out.tail.dtype == torch.float64
    mix = sum(w[0, i] * to_dense(t, V) for i, t in enumerate(targets))
    torch.testing.assert_close(to_dense(out, V), (1 - lam) * mix + lam / V, atol=1e-13, rtol=1e-12)
