"""The gate learns from a proper scoring rule on the true token, never from the student's KD loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mtkd_train.aggregate import GateNetwork, gate_scoring_loss
from mtkd_train.data import CachedDistillDataset
from mtkd_train.objective import Objective
from tests.mtkd_train._train_target import LMCache

VOCAB, HIDDEN = 32, 12


def test_scoring_loss_is_the_mixture_nll_of_the_labelled_rows() -> None:
    log_true = torch.log(torch.tensor([[0.5, 0.1], [0.2, 0.4], [0.3, 0.3]]))
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    labels = torch.tensor([3, 4, -100])
    want = -(torch.log(torch.tensor(0.3)) + torch.log(torch.tensor(0.2))) / 2
    assert float(gate_scoring_loss(log_true, w, labels)) == pytest.approx(float(want), rel=1e-6)


def test_gate_follows_the_teacher_that_predicts_the_data_not_the_one_the_student_copies() -> None:
    """Two teachers: A predicts the labels, B is what the student already imitates. A KD-trained
    gate would move to B (the student matches it); the scoring rule moves to A."""
    g = torch.Generator().manual_seed(0)
    p = 256
    probs_a = torch.softmax(3 * torch.randn(p, VOCAB, generator=g), -1)
    probs_b = torch.softmax(3 * torch.randn(p, VOCAB, generator=g), -1)
    labels = torch.multinomial(probs_a, 1, generator=g).squeeze(1)
    log_true = torch.stack([probs_a, probs_b], 1).log().gather(2, labels.view(p, 1, 1).expand(p, 2, 1)).squeeze(-1)
    gate = GateNetwork(HIDDEN, 2, gate_hidden=8)
    hidden = torch.randn(p, HIDDEN, generator=g)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        gate_scoring_loss(log_true, torch.softmax(gate(hidden), -1), labels).backward()
        opt.step()
    w = torch.softmax(gate(hidden), -1).detach()
    assert float(w[:, 0].mean()) > 0.8


@pytest.fixture(scope="module")
def batch(lm_cache: LMCache) -> dict[str, Any]:
    return next(iter(CachedDistillDataset(lm_cache.cache, ["a", "b"], batch_size=6, shuffle=False)))


def test_the_kd_loss_sends_no_gradient_to_the_gate(batch: dict[str, Any]) -> None:
    def objective() -> Objective:
        torch.manual_seed(0)
        return Objective(teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate="gate",
                         aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=0.5, temperature=2.0,
                         gate=GateNetwork(HIDDEN, 2, gate_hidden=8), gate_entropy=0.01)

    b, length = batch["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    logits, hidden = torch.randn(b, length, VOCAB + 8, generator=g), torch.randn(b, length, HIDDEN, generator=g)
    full = objective()
    terms = full(batch, logits.requires_grad_(), hidden, "causal_lm")
    terms["loss"].backward()
    only = objective()
    t2 = only(batch, logits.detach(), hidden, "causal_lm")
    (t2["gate_nll"] + 0.01 * t2["gate_reg"]).backward()
    for a, b_ in zip(full.gate.parameters(), only.gate.parameters()):  # type: ignore[union-attr]
        torch.testing.assert_close(a.grad, b_.grad)
    assert {"gate_nll", "gate_entropy", "gate_weights"} <= set(terms)
    assert any(float(p.grad.abs().sum()) > 0 for p in full.gate.parameters())  # type: ignore[union-attr]
