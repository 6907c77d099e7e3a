"""Predictive uncertainty of the student: MC-dropout (BALD) and expected calibration error.

* :func:`mc_dropout_predict` runs a stochastic forward pass ``S`` times and returns the mean
  probabilities, the predictive entropy ``H[E_s p_s]`` (total uncertainty), the expected entropy
  ``E_s H[p_s]`` (aleatoric) and their difference, the mutual information between the prediction
  and the weights (BALD; epistemic). Cost: ``S`` forward passes.
* :func:`expected_calibration_error` is the standard equal-width-bin ECE (Guo et al., 2017):
  ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` with bins ``(b/M, (b+1)/M]`` (confidence 0 goes to
  the first bin). Cost ``O(n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "MCDropoutPrediction",
    "UncertaintyError",
    "calibration_bins",
    "ece_from_bins",
    "expected_calibration_error",
    "mc_dropout_predict",
]


class UncertaintyError(ValueError):
    """Bad input to an uncertainty function; the message says what was expected."""


class MCDropoutPrediction(NamedTuple):
    """Result of :func:`mc_dropout_predict`; shapes follow the model's logits ``(..., C)``.

    Attributes:
        mean_probs: ``(..., C)`` ``E_s softmax(logits_s)``.
        predictive_entropy: ``(...,)`` ``H[mean_probs]`` in nats.
        expected_entropy: ``(...,)`` ``E_s H[softmax(logits_s)]``.
        mutual_information: ``(...,)`` ``predictive_entropy - expected_entropy`` (>= 0).
    """

    mean_probs: torch.Tensor
    predictive_entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.where(probs > 0, probs * probs.clamp(min=1e-45).log(), 0.0).sum(dim=-1)


@torch.no_grad()
def mc_dropout_predict(model_fn: Callable[[], torch.Tensor], n_samples: int) -> MCDropoutPrediction:
    """Monte-Carlo dropout prediction.

    Args:
        model_fn: Callable with no arguments returning logits ``(..., C)``; dropout must be
            active (``model.train()``, or dropout layers switched on) for the samples to differ.
        n_samples: Number of stochastic passes ``S >= 1``.

    Returns:
        :class:`MCDropoutPrediction`. The mutual information is clamped at 0 (it is
        non-negative by Jensen's inequality; tiny negatives are rounding).

    Raises:
        UncertaintyError: ``n_samples < 1``.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise UncertaintyError(f"n_samples must be a positive int, got {n_samples!r}")
    probs = torch.stack([torch.softmax(model_fn().float(), dim=-1) for _ in range(n_samples)])
    mean = probs.mean(dim=0)  # (..., C)
    total = _entropy(mean)  # (...,)
    expected = _entropy(probs).mean(dim=0)  # (...,)
    return MCDropoutPrediction(mean, total, expected, (total - expected).clamp(min=0.0))


def _confidence_and_correct(
    probs: torch.Tensor | None,
    labels: torch.Tensor | None,
    confidences: torch.Tensor | None,
    correct: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if probs is not None:
        if labels is None or confidences is not None or correct is not None:
            raise UncertaintyError("pass either probs and labels, or confidences and correct")
        conf, pred = probs.reshape(-1, probs.shape[-1]).max(dim=-1)
        y = labels.reshape(-1)
        keep = y != ignore_index
        return conf[keep], (pred == y)[keep]
    if confidences is None or correct is None or labels is not None:
        raise UncertaintyError("pass either probs and labels, or confidences and correct")
    if confidences.shape != correct.shape:
        raise UncertaintyError(
            f"confidences {tuple(confidences.shape)} and correct {tuple(correct.shape)} differ"
        )
    return confidences.reshape(-1), correct.reshape(-1).to(torch.bool)


def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Per-bin sums for the ECE, on the inputs' device; sums of several batches (or ranks) add up.

    Args:
        confidences: ``(n,)`` confidences in ``[0, 1]``.
        correct: ``(n,)`` bool, whether each prediction was right.
        n_bins: Number of equal-width bins ``M``.

    Returns:
        ``(3, M)`` float64: count, summed confidence and summed correctness per bin.
    """
    conf = confidences.reshape(-1).double()
    # bin b holds (b/M, (b+1)/M]; ceil(c*M) - 1 does that, and c = 0 joins bin 0.
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(min=0, max=n_bins - 1)  # (n,)
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=conf.device)
    out[0].index_add_(0, bins, torch.ones_like(conf))
    out[1].index_add_(0, bins, conf)
    out[2].index_add_(0, bins, correct.reshape(-1).double())
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    """ECE from :func:`calibration_bins` sums: ``sum_b |hits_b - conf_b| / n``; 0.0 for no samples."""
    n = float(bins[0].sum())
    return float((bins[2] - bins[1]).abs().sum() / n) if n > 0 else 0.0


def expected_calibration_error(
    probs: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    confidences: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    n_bins: int = 15,
    ignore_index: int = -100,
) -> float:
    """Equal-width-bin expected calibration error.

    Args:
        probs: ``(..., C)`` predicted probabilities; confidence = max, prediction = argmax.
        labels: ``(...,)`` int64 true classes (``ignore_index`` rows are skipped).
        confidences: ``(n,)`` confidences in ``[0, 1]``, instead of ``probs``/``labels``.
        correct: ``(n,)`` bool, whether each prediction was right.
        n_bins: Number of equal-width bins ``M`` on ``[0, 1]``.
        ignore_index: Label value to skip.

    Returns:
        ECE in ``[0, 1]``; 0.0 for no samples.

    Raises:
        UncertaintyError: inconsistent arguments, ``n_bins < 1`` or confidences outside
            ``[0, 1]``.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise UncertaintyError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, hit = _confidence_and_correct(probs, labels, confidences, correct, ignore_index)
    if conf.numel() == 0:
        return 0.0
    if bool(((conf < 0) | (conf > 1)).any()):
        raise UncertaintyError("confidences must lie in [0, 1]")
    return ece_from_bins(calibration_bins(conf, hit, n_bins))
