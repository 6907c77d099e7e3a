"""A merged target whose support is the whole vocabulary has no bucket: finite loss, same gradient.

Two teachers' top-3 of 4 classes cover all 4 classes while each keeps a tail: the bucket (any
other token) is empty, the student cannot put mass there, and the bucket term is left out on
both the reference and the fused path (regression: it gave an infinite loss and NaN gradients).
"""

from __future__ import annotations

import torch

from mtkd_train.losses import fused_kd_ce_loss, kd_loss
from mtkd_train.targets import SparseTargets


def _full_support_target() -> SparseTargets:
    idx = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    p = torch.tensor([[0.4, 0.1, 0.1, 0.2], [0.3, 0.2, 0.2, 0.1]])
    return SparseTargets(idx, p.log(), 1 - p.sum(1))  # tails 0.2: mass of tokens "the others" kept


def test_full_support_bucket_is_finite_and_fused_equals_reference() -> None:
    t = _full_support_target()
    z1 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z2 = z1.detach().clone().requires_grad_()
    ref = kd_loss(z1, t, kind="forward_kl", temperature=1.0, target_temperature=1.0, tail_mode="bucket",
                  vocab_size=4)
    ref.backward()
    fused = fused_kd_ce_loss(z2, t, torch.tensor([0, 1]), alpha=1.0, temperature=1.0, target_temperature=1.0,
                             tail_mode="bucket", vocab_size=4)
    fused.loss.backward()
    assert torch.isfinite(ref) and torch.isfinite(fused.loss)
    assert z1.grad is not None and z2.grad is not None and torch.isfinite(z2.grad).all()
    torch.testing.assert_close(fused.kd, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z2.grad, z1.grad, atol=1e-6, rtol=1e-5)
    # the kept part alone: sum_S p log(p / q), the tail left out
    logq = torch.log_softmax(z1.detach(), -1)
    manual = (t.logp.exp() * (t.logp - logq.gather(1, t.indices))).sum(1).mean()
    torch.testing.assert_close(ref.detach(), manual, atol=1e-6, rtol=1e-5)
