"""`time_fused_paths`: both fused paths timed on the same synthetic inputs, and the choice follows the margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd_train.losses import fused_kd_ce_loss, fused_linear_kd_ce_loss
from mtkd_train.losses._impl_choice import MARGIN, _synthetic, time_fused_paths


def test_both_paths_are_timed_and_the_choice_follows_the_margin() -> None:
    t = time_fused_paths(96, 16, 700, support=40, alpha=0.5, rounds=2, kernels="eager")
    assert t.fused_ms > 0 and t.fused_head_ms > 0
    assert t.choice == ("fused" if t.fused_ms < (1 - MARGIN) * t.fused_head_ms else "fused_head")
    assert t.to_dict()["choice"] == t.choice


def test_the_paths_are_timed_on_the_same_objective() -> None:
    """The synthetic target is a valid merged target, and both paths give it the same loss and gradients."""
    hidden, weight, target, labels = _synthetic(80, 12, 500, 33, torch.device("cpu"), torch.float32, seed=3)
    assert target.indices.shape == (80, 33) and int(target.indices.max()) < 500
    assert all(len(set(row.tolist())) == 33 for row in target.indices)  # no repeated token in a row
    mass = target.logp.exp().sum(dim=1) + target.tail
    torch.testing.assert_close(mass, torch.ones(80), atol=1e-5, rtol=0)
    grads = []
    for head in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = (fused_linear_kd_ce_loss(h, w, target, labels, alpha=0.5, kernels="eager") if head
               else fused_kd_ce_loss(F.linear(h, w), target, labels, alpha=0.5, kernels="eager"))
        out.loss.backward()
        grads.append((out.loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
