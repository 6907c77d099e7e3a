"""A learned gate: an MLP on the student's hidden state picks the teacher mixture.

``GateNetwork`` maps hidden states ``(..., H)`` (per position, or mean-pooled per sample) to
``(..., N)`` logits; the trainer puts them in ``AggregationContext.gate_logits`` and the ``gate``
operator mixes the teachers with ``softmax(gate_logits)``. The gate is trained by the KD loss
itself (the merged target depends on the weights), which rewards a gate that picks whichever
teacher the student already matches best; :func:`gate_entropy_regularizer` counters the collapse
onto one teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    Aggregator,
)
from mtkd_train.aggregate._linear import parse_num_teachers
from mtkd_train.targets import SparseTargets

__all__ = ["GateAggregator", "GateNetwork", "gate_entropy_regularizer"]


class GateNetwork(nn.Module):
    """Two-layer MLP gate: ``Linear(H, hidden) -> GELU -> Linear(hidden, N)``.

    The output layer starts at zero, so a fresh gate gives uniform weights (the ``mean`` operator)
    and moves away from it only as the loss asks.

    Args:
        hidden_size: Student hidden width ``H``.
        num_teachers: ``N``.
        gate_hidden: Width of the hidden layer.
        pooled: If True, inputs are ``(B, T, H)`` and one weight vector is computed per sample
            from the (masked) mean over ``T``, then broadcast over positions.
        detach_input: If True (default), the gate does not send gradients into the student's
            hidden states, so the student's representation is not bent to please the gate.

    Raises:
        AggregationConfigError: a size is not a positive int.
    """

    def __init__(
        self,
        hidden_size: int,
        num_teachers: int,
        *,
        gate_hidden: int = 64,
        pooled: bool = False,
        detach_input: bool = True,
    ) -> None:
        super().__init__()
        for option, value in (("hidden_size", hidden_size), ("gate_hidden", gate_hidden)):
            if not isinstance(value, int) or value < 1:
                raise AggregationConfigError(f"{option} must be a positive int, got {value!r}")
        self.num_teachers = parse_num_teachers(num_teachers)
        self.pooled = pooled
        self.detach_input = detach_input
        output = nn.Linear(gate_hidden, num_teachers)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.net = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.GELU(), output)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gate logits.

        Args:
            hidden: ``(..., H)`` per-position hidden states; ``(B, T, H)`` when ``pooled``.
            mask: ``(B, T)`` bool, True on real tokens; only used when ``pooled``.

        Returns:
            ``(..., N)`` logits with the same leading shape as ``hidden``.

        Raises:
            AggregationInputError: ``pooled`` with an input that is not ``(B, T, H)``.
        """
        x = hidden.detach() if self.detach_input else hidden
        if not self.pooled:
            return self.net(x)
        if x.dim() != 3:
            raise AggregationInputError(
                f"a pooled gate needs hidden states (B, T, H), got {tuple(x.shape)}"
            )
        m = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(x.dtype)
        m = m.unsqueeze(-1)  # (B, T, 1)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, H)
        return self.net(pooled).unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, T, N)


def gate_entropy_regularizer(
    weights: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative mean entropy of the gate's weights; add ``coef * reg`` to the loss.

    Minimising it maximises the entropy of the teacher mixture, against collapse onto one
    teacher. Its minimum is ``-log N`` (uniform weights), its maximum 0 (one-hot).

    Args:
        weights: ``(P, N)`` convex weights (e.g. ``softmax(gate_logits)``).
        mask: ``(P,)`` bool, positions to average over (default all).

    Returns:
        Scalar ``-mean_p H(weights[p])``; 0 if the mask selects nothing.
    """
    ent = -torch.where(weights > 0, weights * weights.clamp(min=1e-30).log(), 0.0).sum(dim=1)
    if mask is None:
        return -ent.mean()
    m = mask.to(ent.dtype)
    return -(ent * m).sum() / m.sum().clamp(min=1.0)


def gate_scoring_loss(
    log_true: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The gate's proper scoring rule: NLL of the true token under the gated mixture.

    ``-mean_p log sum_i w_i(p) p_i(y_p)`` over labelled rows. It rewards the weights that put
    mass on the teacher that predicted the data, whatever the student currently matches (training
    the gate through the student's KD loss instead rewards the teacher the student already
    imitates, and collapses onto it).

    Args:
        log_true: ``(P, N)`` each teacher's log-probability of the true token (``-inf`` allowed).
        weights: ``(P, N)`` gate weights, with gradients.
        labels: ``(P,)`` true tokens; ``-100`` rows are skipped.

    Returns:
        Scalar; 0 when no row is labelled.
    """
    keep = (labels != -100) & torch.isfinite(log_true).any(dim=1)  # (P,)
    mix = torch.logsumexp(log_true + weights.clamp_min(1e-30).log(), dim=1)  # (P,)
    mix = torch.where(keep, mix, torch.zeros_like(mix))
    return -mix.sum() / keep.sum().clamp_min(1)


@dataclass(frozen=True)
class GateAggregator(Aggregator):
    """``gate``: ``w = softmax(ctx.gate_logits)`` (learned, per position).

    Declares ``gate_logits`` in its context: a trainer builds a :class:`GateNetwork` on the
    student's hidden state for it.

    Attributes:
        num_teachers: ``N``.
    """

    num_teachers: int
    context: ClassVar[frozenset[str]] = frozenset({"gate_logits"})

    def __post_init__(self) -> None:
        parse_num_teachers(self.num_teachers)

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        logits = ctx.gate_logits
        expected = (targets[0].logp.shape[0], self.num_teachers)
        if logits is None or tuple(logits.shape) != expected:
            got = None if logits is None else tuple(logits.shape)
            raise AggregationInputError(
                f"'gate' needs ctx.gate_logits of shape {expected}, got {got}; run the "
                "GateNetwork on the student's hidden states and flatten to (P, N)"
            )
        return torch.softmax(logits, dim=1)
