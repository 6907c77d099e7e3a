"""`union_mixture` (the table-free linear pool) equals the mixture over `build_union`'s table."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import build_union
from mtkd_train.aggregate._union import union_mixture
from mtkd_train.targets import SparseTargets


def _targets(n: int, p: int, v: int, k: int, seed: int) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(p)])
        logp = torch.log_softmax(torch.randn(p, k, generator=g), 1) + math.log(0.8)
        logp = torch.where(torch.rand(p, k, generator=g) < 0.25, -math.inf, logp)
        logp[1] = -math.inf  # a padding row
        tail = torch.rand(p, generator=g) * 0.3
        tail[2] = 0.0
        out.append(SparseTargets(idx, logp.requires_grad_(True), tail.requires_grad_(True)))
    return out


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize(("n", "v", "k"), [(1, 12, 5), (3, 12, 5), (4, 300, 16), (2, 9, 9)])
def test_mixture_equals_the_table_and_its_gradient(mode: str, n: int, v: int, k: int) -> None:
    ts = _targets(n, 23, v, k, seed=n * 100 + v)
    w = torch.softmax(torch.randn(23, n, generator=torch.Generator().manual_seed(1)), 1).requires_grad_(True)
    u = build_union(ts, vocab_size=v, tail_mode=mode)  # type: ignore[arg-type]
    ref = torch.einsum("pn,pnu->pu", w, u.logp.exp())
    m = union_mixture(ts, w, vocab_size=v, tail_mode=mode)  # type: ignore[arg-type]
    assert torch.equal(m.indices, u.indices) and torch.equal(m.valid, u.valid) and torch.equal(m.size, u.size)
    torch.testing.assert_close(m.tail_out, u.tail_out, rtol=0, atol=0)
    torch.testing.assert_close(m.probs, ref, rtol=0, atol=1e-6)
    assert (m.probs[~m.valid] == 0).all()
    leaves = [w, *(t.logp for t in ts), *(t.tail for t in ts)]
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((m.probs * probe).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((ref * probe).sum(), leaves, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-5, atol=1e-6)


def test_ids_beyond_the_vocabulary_still_get_a_correct_union() -> None:
    """The int32 key path is taken only when every kept id is in [0, V); otherwise int64 keys."""
    t0 = SparseTargets(torch.tensor([[5, 70000], [1, 2]]), torch.log(torch.tensor([[0.5, 0.5], [0.6, 0.4]])),
                       torch.zeros(2))
    t1 = SparseTargets(torch.tensor([[70000, 3], [2, 9]]), torch.log(torch.tensor([[0.5, 0.5], [0.6, 0.4]])),
                       torch.zeros(2))
    u = build_union([t0, t1], vocab_size=10, tail_mode="bucket")
    assert u.indices.tolist() == [[3, 5, 70000], [1, 2, 9]]
    assert u.size.tolist() == [3, 3]


def _dense(t: SparseTargets, v: int) -> torch.Tensor:
    """``(P, V + 1)``: each kept token's probability, and the tail in the last column."""
    kept = t.logp > -math.inf
    out = torch.zeros(t.logp.shape[0], v + 1, dtype=torch.float64)
    out[:, :v].scatter_add_(1, torch.where(kept, t.indices, 0), torch.where(kept, t.logp.double().exp(), 0.0))
    out[:, v] = t.tail.double()
    return out


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("v", "k"), [(12, 5), (9, 9), (300, 16)])
def test_one_teacher_at_weight_one_skips_the_union_and_equals_it(mode: str, smoothing: float, v: int, k: int
                                                                 ) -> None:
    from mtkd_train.aggregate import linear_pool

    (t,) = _targets(1, 23, v, k, seed=v + k)
    t = SparseTargets(t.indices, t.logp.detach(), t.tail.detach())
    ones = torch.ones(23, 1)
    fast = linear_pool([t], ones, vocab_size=v, tail_mode=mode, smoothing=smoothing)  # type: ignore[arg-type]
    slow = linear_pool([t], ones.clone().requires_grad_(True), vocab_size=v, tail_mode=mode,  # type: ignore[arg-type]
                       smoothing=smoothing)  # a weight that needs a gradient takes the union path
    assert fast.indices is t.indices  # no sort, no copy: the teacher's own layout
    torch.testing.assert_close(_dense(fast, v), _dense(slow, v).detach(), rtol=0, atol=1e-6)
    half = linear_pool([t], torch.full((23, 1), 0.5), vocab_size=v, tail_mode=mode)  # type: ignore[arg-type]
    assert half.indices is not t.indices  # any other weight is pooled on the union
