"""Edges of `mtkd_train.aggregate._gate` that survivors of the mutation run (docs/TESTING.md)
showed untested: the gate's defaults and size errors, one-row means of the regulariser and the
scoring rule, rows no teacher allows."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import AggregationConfigError, AggregationContext, AggregationInputError
from mtkd_train.aggregate._gate import (
    GateAggregator,
    GateNetwork,
    gate_entropy_regularizer,
    gate_scoring_loss,
)
from mtkd_train.targets import from_dense


def test_gate_defaults_are_a_64_wide_hidden_layer_and_a_detached_input() -> None:
    gate = GateNetwork(8, 3)
    assert (gate.net[0].out_features, gate.net[2].out_features) == (64, 3)
    hidden = torch.randn(5, 8, requires_grad=True)
    gate(hidden).sum().backward()
    assert hidden.grad is None  # the student's hidden states get no gradient from the gate


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
    ({"hidden_size": 8.0}, "hidden_size must be a positive int, got 8.0"),
    ({"gate_hidden": 0}, "gate_hidden must be a positive int, got 0"),
    ({"gate_hidden": -4}, "gate_hidden must be a positive int, got -4"),
])
def test_gate_sizes_must_be_positive_ints(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"hidden_size": 8, "num_teachers": 2, **kwargs}
    with pytest.raises(AggregationConfigError) as err:
        GateNetwork(**args)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_regulariser_over_one_masked_position_is_minus_its_entropy() -> None:
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    reg = gate_entropy_regularizer(weights, torch.tensor([False, True]))
    torch.testing.assert_close(reg, torch.tensor(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_scoring_rule_skips_rows_no_teacher_allows_and_averages_one_row() -> None:
    log_true = torch.tensor([[math.log(0.5), math.log(0.25)], [-math.inf, -math.inf]])
    weights = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    loss = gate_scoring_loss(log_true, weights, torch.tensor([3, 4]))
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.375)))


def test_one_wide_layers_are_allowed_and_the_teacher_count_is_kept() -> None:
    gate = GateNetwork(1, 3, gate_hidden=1)
    assert gate.num_teachers == 3
    assert gate(torch.randn(4, 1)).shape == (4, 3)


def _pooled_gate() -> GateNetwork:
    gate = GateNetwork(4, 2, gate_hidden=8, pooled=True)
    with torch.no_grad():  # a trained gate: the zero-initialised output layer would hide the input
        gate.net[2].weight.normal_(generator=torch.Generator().manual_seed(0))
    return gate


def test_a_pooled_gate_without_mask_scores_the_mean_over_positions() -> None:
    gate, hidden = _pooled_gate(), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    expected = gate.net(hidden.mean(dim=1)).unsqueeze(1).expand(-1, 3, -1)
    torch.testing.assert_close(gate(hidden), expected)


def test_a_pooled_gate_with_a_mask_scores_the_mean_over_real_tokens() -> None:
    gate, hidden = _pooled_gate(), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True, False, False], [True, True, False]])
    expected = torch.stack([gate.net(hidden[0, 0]), gate.net(hidden[1, :2].mean(dim=0))]).unsqueeze(1)
    torch.testing.assert_close(gate(hidden, mask), expected.expand(-1, 3, -1))


@pytest.mark.parametrize(("gate_logits", "got"), [(None, "None"), (torch.zeros(3, 3), "(3, 3)")])
def test_gate_operator_names_the_shape_it_got_and_the_fix(gate_logits: torch.Tensor | None, got: str) -> None:
    targets = [from_dense(torch.full((3, 4), 0.25), 2)] * 2
    with pytest.raises(AggregationInputError) as err:
        GateAggregator(2).weights(targets, AggregationContext(gate_logits=gate_logits))
    assert str(err.value) == (
        f"'gate' needs ctx.gate_logits of shape (3, 2), got {got}; run the "
        "GateNetwork on the student's hidden states and flatten to (P, N)"
    )


def test_a_single_teacher_gate_gives_it_all_the_weight() -> None:
    teacher = from_dense(torch.full((3, 4), 0.25), 2)
    w = GateAggregator(1).weights([teacher], AggregationContext(gate_logits=torch.randn(3, 1)))
    torch.testing.assert_close(w, torch.ones(3, 1))
