"""Relational feature losses: zero at a match, invariant where they should be, and trainable."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.losses._kd import LossConfigError
from mtkd_train.losses._relational import relational_loss


@pytest.mark.parametrize("kind", ["similarity", "contrastive"])
def test_zero_for_the_same_structure_in_another_space(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))  # a rotation keeps every cosine
    rotated = (t @ q) * 3.0  # and a scale
    assert float(relational_loss(rotated, t, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 4, generator=g)  # another width is fine
    assert float(relational_loss(other, t, kind=kind)) > 1e-3


def test_similarity_matches_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)
    cs = torch.nn.functional.cosine_similarity(s.unsqueeze(1), s.unsqueeze(0), dim=-1)
    ct = torch.nn.functional.cosine_similarity(t.unsqueeze(1), t.unsqueeze(0), dim=-1)
    off = ~torch.eye(5, dtype=torch.bool)
    ref = ((cs - ct)[off] ** 2).mean()
    assert float(relational_loss(s, t)) == pytest.approx(float(ref), rel=1e-5)


def test_contrastive_is_a_kl_between_row_softmaxes() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    tau = 0.5
    n = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    ss, tt = n(s) @ n(s).T, n(t) @ n(t).T
    total = 0.0
    for i in range(4):
        keep = [j for j in range(4) if j != i]
        p = torch.softmax(tt[i, keep] / tau, -1)
        q = torch.softmax(ss[i, keep] / tau, -1)
        total += float((p * (p.log() - q.log())).sum())
    assert float(relational_loss(s, t, kind="contrastive", tau=tau)) == pytest.approx(total / 4, rel=1e-5)


def test_gradient_descent_reduces_it_and_teacher_gets_no_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 9, generator=g, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.5)
    first = float(relational_loss(s, t, kind="contrastive", tau=0.2).detach())
    for _ in range(50):
        opt.zero_grad()
        relational_loss(s, t, kind="contrastive", tau=0.2).backward()
        opt.step()
    assert float(relational_loss(s, t, kind="contrastive", tau=0.2).detach()) < 0.5 * first
    assert t.grad is None


def test_bad_arguments_are_named() -> None:
    with pytest.raises(LossConfigError, match="kind"):
        relational_loss(torch.zeros(2, 2), torch.zeros(2, 2), kind="angle")  # type: ignore[arg-type]
    with pytest.raises(LossConfigError, match="same M"):
        relational_loss(torch.zeros(2, 2), torch.zeros(3, 2))
    assert float(relational_loss(torch.ones(1, 2), torch.ones(1, 3))) == 0.0
