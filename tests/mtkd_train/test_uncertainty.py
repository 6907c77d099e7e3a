"""Tests for mtkd_train.uncertainty: ECE on hand-computed examples, MC-dropout (BALD)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtkd_train.uncertainty import UncertaintyError, expected_calibration_error, mc_dropout_predict


def test_ece_hand_computed_two_bins() -> None:
    # bins (0, .5] and (.5, 1]:
    #   low  = {.3 wrong, .5 right}: acc .5, conf .4  -> gap .1, weight 2/5
    #   high = {.9 right, .8 wrong, .6 right}: acc 2/3, conf .7667 -> gap .1, weight 3/5
    conf = torch.tensor([0.3, 0.5, 0.9, 0.8, 0.6])
    correct = torch.tensor([False, True, True, False, True])
    ece = expected_calibration_error(confidences=conf, correct=correct, n_bins=2)
    assert ece == pytest.approx(0.4 * 0.1 + 0.6 * 0.1)


def test_ece_from_probabilities_and_labels() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.25, 0.35, 0.4], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 1, 2, -100])  # last row ignored
    # 15 bins: .7 (right) in bin 10, .8 (wrong) in bin 11, .4 (right) in bin 5
    expected = (abs(1 - 0.7) + abs(0 - 0.8) + abs(1 - 0.4)) / 3
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_ece_perfectly_calibrated_is_zero_and_overconfident_is_positive() -> None:
    conf = torch.full((10,), 0.7)
    right = torch.tensor([True] * 7 + [False] * 3)
    assert expected_calibration_error(confidences=conf, correct=right) == pytest.approx(
        0.0, abs=1e-6
    )
    assert expected_calibration_error(
        confidences=conf, correct=torch.zeros(10, dtype=torch.bool)
    ) == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probs": torch.rand(3, 2)}, "either probs and labels"),
        ({"confidences": torch.tensor([1.2]), "correct": torch.tensor([True])}, r"\[0, 1\]"),
        (
            {"confidences": torch.rand(3), "correct": torch.ones(3, dtype=torch.bool), "n_bins": 0},
            "n_bins",
        ),
    ],
)
def test_ece_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(UncertaintyError, match=match):
        expected_calibration_error(**kwargs)


def test_mc_dropout_deterministic_model_has_zero_mutual_information() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = mc_dropout_predict(lambda: model(x), n_samples=8)
    torch.testing.assert_close(out.mean_probs, torch.softmax(model(x), -1).detach())
    torch.testing.assert_close(out.mutual_information, torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.predictive_entropy, out.expected_entropy, atol=1e-6, rtol=0)
    assert bool((out.predictive_entropy > 0).all()) and bool(
        (out.predictive_entropy <= math.log(3)).all()
    )


def test_mc_dropout_model_has_positive_mutual_information() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    model.train()  # dropout active
    x = torch.randn(5, 4) * 3
    out = mc_dropout_predict(lambda: model(x), n_samples=30)
    assert bool((out.mutual_information > 1e-3).all())
    torch.testing.assert_close(out.mean_probs.sum(-1), torch.ones(5))
    model.eval()
    still = mc_dropout_predict(lambda: model(x), n_samples=5)
    assert float(still.mutual_information.max()) < 1e-6


def test_mc_dropout_rejects_zero_samples() -> None:
    with pytest.raises(UncertaintyError, match="n_samples"):
        mc_dropout_predict(lambda: torch.zeros(1, 2), n_samples=0)
