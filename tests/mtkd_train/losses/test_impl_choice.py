"""`time_fused_paths`: both fused paths timed on the same synthetic step, and the faster one chosen."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mtkd_train.losses._impl_choice as impl_choice
from mtkd_train.losses import FusedLoss, fused_kd_ce_loss, fused_linear_kd_ce_loss
from mtkd_train.losses._impl_choice import MARGIN, _synthetic, time_fused_paths
from mtkd_train.rows import take_rows


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_both_paths_are_timed_on_a_padded_head(autocast: torch.dtype | None) -> None:
    t = time_fused_paths(96, 16, 700, support=40, alpha=0.5, seq_len=33, head_rows=712, rounds=2, kernels="eager",
                         vocab_size=700, autocast=autocast)
    assert t.fused_ms > 0 and t.fused_head_ms > 0 and t.choice in ("fused", "fused_head")
    assert t.choice == ("fused" if t.fused_ms < (1 - MARGIN) * t.fused_head_ms else "fused_head")


@pytest.mark.parametrize(("fused_s", "head_s", "choice"), [(0.005, 0.03, "fused"), (0.03, 0.005, "fused_head")])
def test_the_faster_path_is_chosen(monkeypatch: pytest.MonkeyPatch, fused_s: float, head_s: float,
                                   choice: str) -> None:
    def slow(seconds: float) -> Any:
        def loss(*args: Any, **_: Any) -> FusedLoss:
            time.sleep(seconds)
            value = args[0].sum() * 0.0  # a graph to the inputs, so backward runs
            return FusedLoss(value, value.detach(), value.detach())
        return loss

    monkeypatch.setattr(impl_choice, "fused_kd_ce_loss", slow(fused_s))
    monkeypatch.setattr(impl_choice, "fused_linear_kd_ce_loss", slow(head_s))
    assert time_fused_paths(40, 8, 300, support=10, alpha=0.5, rounds=3).choice == choice


def test_the_paths_are_timed_on_the_same_objective() -> None:
    """The synthetic target is a valid merged target on the loss rows (all but each sequence's last position),
    and both paths give it the same loss and gradients."""
    x = _synthetic(80, 17, 12, 512, 500, 33, torch.device("cpu"), torch.float32, seed=3)
    p = x.rows.numel()
    assert x.hidden.shape == (5, 17, 12) and p == 80 and int(x.rows.max()) < 5 * 17 - 1
    assert x.target.indices.shape == (p, 33) and int(x.target.indices.max()) < 500
    assert all(len(set(row.tolist())) == 33 for row in x.target.indices)  # no repeated token in a row
    torch.testing.assert_close(x.target.logp.exp().sum(dim=1) + x.target.tail, torch.ones(p), atol=1e-5, rtol=0)
    grads = []
    for head in (False, True):
        h, w = x.hidden.clone().requires_grad_(True), x.weight.clone().requires_grad_(True)
        kw: Any = dict(alpha=0.5, kernels="eager", vocab_size=500)
        out = (fused_linear_kd_ce_loss(take_rows(h, x.rows), w, x.target, x.labels, **kw) if head
               else fused_kd_ce_loss(take_rows(F.linear(h, w), x.rows), x.target, x.labels, **kw))
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
