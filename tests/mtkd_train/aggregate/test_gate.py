"""Tests for the learned gate: network shapes, gradient flow from the KD loss, regulariser."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationContext,
    AggregationInputError,
    GateAggregator,
    GateNetwork,
    gate_entropy_regularizer,
)
from mtkd_train.losses import kd_loss, weighted_forward_kl
from mtkd_train.targets import SparseTargets, from_dense

V, H, N = 10, 6, 3


def _teachers(p: int) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(0)
    return [from_dense(torch.softmax(torch.randn(p, V, generator=g) * 2, -1), k) for k in (2, 3, 4)]


def test_fresh_gate_gives_uniform_weights_per_position() -> None:
    gate = GateNetwork(H, N)
    logits = gate(torch.randn(2, 5, H))
    assert logits.shape == (2, 5, N)
    torch.testing.assert_close(torch.softmax(logits, -1), torch.full((2, 5, N), 1 / N))


def test_pooled_gate_is_constant_over_time_and_ignores_masked_tokens() -> None:
    torch.manual_seed(0)
    gate = GateNetwork(H, N, pooled=True)
    torch.nn.init.normal_(gate.net[2].weight)
    hidden = torch.randn(2, 4, H)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    logits = gate(hidden, mask)
    assert logits.shape == (2, 4, N)
    torch.testing.assert_close(logits[:, 0], logits[:, 3])
    changed = hidden.clone()
    changed[0, 2:] += 100.0  # masked-out positions of sample 0
    torch.testing.assert_close(gate(changed, mask), logits)
    with pytest.raises(AggregationInputError, match=r"\(B, T, H\)"):
        gate(torch.randn(4, H))


def _gate_setup(
    detach: bool,
) -> tuple[GateNetwork, torch.Tensor, torch.Tensor, list[SparseTargets]]:
    torch.manual_seed(1)
    gate = GateNetwork(H, N, detach_input=detach)
    hidden = torch.randn(5, H, requires_grad=True)
    student = torch.randn(5, V, requires_grad=True)
    return gate, hidden, student, _teachers(5)


@pytest.mark.parametrize("path", ["union", "weighted"])
def test_kd_loss_gradient_reaches_every_gate_parameter(path: str) -> None:
    gate, hidden, student, targets = _gate_setup(detach=True)
    opt = torch.optim.SGD(gate.parameters(), lr=1.0)
    for _step in range(2):  # the zero-initialised output layer blocks the first layer at step 0
        opt.zero_grad()
        ctx = AggregationContext(gate_logits=gate(hidden))
        if path == "union":
            merged = GateAggregator(N)(targets, ctx, vocab_size=V, tail_mode="spread")
            loss = kd_loss(student, merged, tail_mode="spread")
        else:
            weights = GateAggregator(N).weights(targets, ctx)
            loss = weighted_forward_kl(student, targets, weights)
        loss.backward()
        out_grad = gate.net[2].weight.grad
        assert out_grad is not None and float(out_grad.abs().sum()) > 0
        assert all(bool(torch.isfinite(p.grad).all()) for p in gate.parameters())
        opt.step()
    assert float(gate.net[0].weight.grad.abs().sum()) > 0  # reached the first layer at step 1
    assert hidden.grad is None  # detach_input keeps the gate's gradient out of the student


def test_attached_gate_sends_gradient_into_hidden_states() -> None:
    gate, hidden, student, targets = _gate_setup(detach=False)
    torch.nn.init.normal_(gate.net[2].weight)
    ctx = AggregationContext(gate_logits=gate(hidden))
    merged = GateAggregator(N)(targets, ctx, vocab_size=V, tail_mode="spread")
    kd_loss(student, merged, tail_mode="spread").backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0


def test_entropy_regularizer_bounds_and_mask() -> None:
    uniform = torch.full((4, N), 1 / N)
    one_hot = torch.eye(N)[[0, 1, 2, 0]]
    assert gate_entropy_regularizer(uniform).item() == pytest.approx(-math.log(N))
    assert gate_entropy_regularizer(one_hot).item() == pytest.approx(0.0)
    mixed = torch.cat([uniform[:2], one_hot[:2]])
    mask = torch.tensor([True, True, False, False])
    assert gate_entropy_regularizer(mixed, mask).item() == pytest.approx(-math.log(N))
    logits = torch.zeros(4, N, requires_grad=True)
    with torch.no_grad():
        logits[:, 0] = 2.0
    gate_entropy_regularizer(torch.softmax(logits, -1)).backward()
    assert bool((logits.grad[:, 0] > 0).all())  # descent lowers the dominant logit


def test_gate_aggregator_requires_gate_logits() -> None:
    with pytest.raises(AggregationInputError, match=r"ctx.gate_logits of shape \(5, 3\)"):
        GateAggregator(N).weights(_teachers(5), AggregationContext())
