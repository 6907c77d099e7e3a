"""`mixture_negentropy` against its definition, `(1 - lam) sum_i w_i sum_v p_i log p_i - lam log V`
with each `p_i` read densely under the spread rule (docs/TESTING.md: written from the survivors
of a mutation run): tail-free targets, a whole vocabulary kept with a rounding tail, one unkept
token, one teacher, float64, and the default smoothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.losses import mixture_negentropy
from mtkd_train.targets import SparseTargets, from_dense, from_samples, to_dense

P, V = 4, 7


def _reference(targets: list[SparseTargets], weights: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    parts = []
    for t in targets:
        p = to_dense(t, V, "spread").double()
        parts.append(torch.where(p > 0, p * p.clamp(min=1e-300).log(), 0.0).sum(-1))
    return (1 - lam) * (weights.double() * torch.stack(parts, 1)).sum(1) - lam * math.log(V)


def _dense_teacher(seed: int, k: int, dtype: torch.dtype = torch.float32) -> SparseTargets:
    g = torch.Generator().manual_seed(seed)
    t = from_dense(torch.softmax(torch.randn(P, V, generator=g, dtype=torch.float64), -1), k)
    return SparseTargets(t.indices, t.logp.to(dtype), t.tail.to(dtype))


def _weights(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.softmax(torch.randn(P, n, generator=torch.Generator().manual_seed(9), dtype=dtype), -1)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_equals_the_dense_definition_with_one_unkept_token_and_a_tail_free_teacher(lam: float) -> None:
    one_out = _dense_teacher(1, V - 1)  # the tail sits on exactly one token
    samples = from_samples(torch.tensor([[0, 3, 5]] * P), torch.tensor([[2, 1, 1]] * P))  # tail 0
    top3 = _dense_teacher(2, 3)
    targets, w = [one_out, samples, top3], _weights(3)
    got = mixture_negentropy(targets, w, V, smoothing=lam)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), _reference(targets, w, lam), atol=1e-5, rtol=1e-5)


def test_defaults_to_no_smoothing() -> None:
    targets, w = [_dense_teacher(3, 2), _dense_teacher(4, 5)], _weights(2)
    torch.testing.assert_close(mixture_negentropy(targets, w, V), mixture_negentropy(targets, w, V, smoothing=0.0))
    torch.testing.assert_close(mixture_negentropy(targets, w, V).double(), _reference(targets, w),
                               atol=1e-5, rtol=1e-5)


def test_a_whole_vocabulary_kept_with_a_rounding_tail_has_no_tail_term() -> None:
    full = _dense_teacher(5, V)
    full = SparseTargets(full.indices, full.logp, torch.full((P,), 1e-3))  # a quantisation leftover
    w = torch.ones(P, 1)
    want = (full.logp.exp() * full.logp).sum(1)
    torch.testing.assert_close(mixture_negentropy([full], w, V), want)


def test_one_teacher_in_double_precision() -> None:
    t = _dense_teacher(6, 3, torch.float64)
    w = torch.ones(P, 1, dtype=torch.float64)
    got = mixture_negentropy([t], w, V, smoothing=0.25)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference([t], w, 0.25), atol=1e-13, rtol=1e-12)


def test_takes_the_targets_dtype_whatever_the_weights() -> None:
    targets = [_dense_teacher(7, 2), _dense_teacher(8, 4)]
    got = mixture_negentropy(targets, _weights(2, torch.float64), V)
    assert got.dtype == torch.float32
