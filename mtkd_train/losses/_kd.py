"""Knowledge-distillation losses on sparse targets, the hard-label loss and their mix.

Temperature: the student's logits are divided by ``T``, the target is re-tempered with
:func:`mtkd_train.targets.retemper` (``p^(1/T)`` renormalised, tail spread), and the divergence is
multiplied by ``T^2`` so gradient magnitudes stay comparable across temperatures (Hinton et al.).
If the cache captured the teacher at temperature ``T_c``, pass ``temperature=T`` and
``target_temperature=T_c``; the target is re-tempered by ``T / T_c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict, Unpack

import torch
import torch.nn.functional as F

from mtkd_train.losses._divergence import (
    LOSS_KINDS,
    sparse_divergence,
    sparse_divergence_from_log_probs,
)
from mtkd_train.targets import SparseTargets, TailMode, parse_tail_mode, retemper

__all__ = [
    "KDOptions",
    "LossConfigError",
    "combine",
    "hard_label_loss",
    "kd_loss",
    "kd_loss_per_position",
    "weighted_forward_kl",
]


class LossConfigError(ValueError):
    """A loss option or input is invalid; the message names it and what was expected."""


def _parse(kind: str, temperature: float, target_temperature: float, skew: float) -> None:
    if kind not in LOSS_KINDS:
        raise LossConfigError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    for option, value in (("temperature", temperature), ("target_temperature", target_temperature)):
        if not (isinstance(value, int | float) and 0 < value < math.inf):
            raise LossConfigError(f"{option} must be a positive finite number, got {value!r}")
    if not (isinstance(skew, int | float) and 0 <= skew < 1):
        raise LossConfigError(f"skew must be in [0, 1), got {skew!r}")


def _flatten_logits(logits: torch.Tensor, vocab_size: int | None) -> tuple[torch.Tensor, int]:
    """Flatten ``(..., V_s)`` logits to ``(P, V)``: padded vocabulary columns cut, upcast."""
    width = logits.shape[-1]
    vocab = width if vocab_size is None else vocab_size
    if not isinstance(vocab, int) or not 0 < vocab <= width:
        raise LossConfigError(
            f"vocab_size={vocab_size!r} must be a positive int no larger than the logits' last "
            f"dimension ({width}); padded vocabulary columns beyond it are dropped"
        )
    return logits[..., :vocab].reshape(-1, vocab).float(), vocab  # (P, V)


def _flatten_target(logits: torch.Tensor, target: SparseTargets) -> SparseTargets:
    """Flatten a ``(..., K)`` target to ``(P, K)`` after checking it has the logits' positions."""
    if target.logp.shape[:-1] != logits.shape[:-1]:
        raise LossConfigError(
            f"target positions {tuple(target.logp.shape[:-1])} do not match logits positions "
            f"{tuple(logits.shape[:-1])}"
        )
    k = target.logp.shape[-1]
    return SparseTargets(
        target.indices.reshape(-1, k), target.logp.reshape(-1, k).float(), target.tail.reshape(-1)
    )


def _flatten(
    logits: torch.Tensor, target: SparseTargets, vocab_size: int | None
) -> tuple[torch.Tensor, SparseTargets, int]:
    """Flatten ``(..., V)`` / ``(..., K)`` to 2-D, cut padded vocabulary columns, upcast."""
    z, vocab = _flatten_logits(logits, vocab_size)
    return z, _flatten_target(logits, target), vocab


def kd_loss_per_position(
    student_logits: torch.Tensor,
    target: SparseTargets,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    target_temperature: float = 1.0,
    tail_mode: TailMode = "bucket",
    vocab_size: int | None = None,
    skew: float = 0.1,
) -> torch.Tensor:
    """Divergence between each position's target and student distribution, times ``T^2``.

    Args:
        student_logits: ``(..., V_s)`` dense student logits.
        target: Sparse target ``(..., K)`` (e.g. a merged multi-teacher target).
        kind: ``forward_kl`` KL(p||q), ``reverse_kl`` KL(q||p), ``js`` Jensen-Shannon, ``tv``
            total variation, ``skew_kl`` KL(p || a p + (1-a) q), ``skew_reverse_kl``
            KL(q || a q + (1-a) p). See ``docs/LOSSES.md``.
        temperature: Distillation temperature ``T > 0``.
        target_temperature: Temperature ``T_c`` the target was captured at.
        tail_mode: ``"bucket"`` (tail = one extra outcome) or ``"spread"`` (tail spread over
            the unkept tokens).
        vocab_size: True vocabulary size ``V <= V_s``; logits beyond it (padded embedding
            rows) are dropped. Default ``V_s``.
        skew: ``a`` in ``[0, 1)`` for the skew divergences.

    Returns:
        ``(...,)`` float32 losses (``+inf`` where the divergence is infinite, e.g. reverse KL
        against a zero tail).

    Raises:
        LossConfigError: an unknown ``kind``, bad temperature/skew/vocab_size, or shape mismatch.
    """
    _parse(kind, temperature, target_temperature, skew)
    parse_tail_mode(tail_mode)
    z, flat, vocab = _flatten(student_logits, target, vocab_size)
    if temperature != target_temperature:
        flat = retemper(flat, temperature / target_temperature, vocab)
    loss = sparse_divergence(z / temperature, flat, kind=kind, tail_mode=tail_mode, skew=skew)
    return (loss * temperature**2).reshape(student_logits.shape[:-1])


def _masked_mean(values: torch.Tensor) -> torch.Tensor:
    return values.sum() / max(values.numel(), 1)


class KDOptions(TypedDict, total=False):
    """The keyword options :func:`kd_loss` forwards to :func:`kd_loss_per_position`."""

    kind: str
    temperature: float
    target_temperature: float
    tail_mode: TailMode
    vocab_size: int | None
    skew: float


def kd_loss(
    student_logits: torch.Tensor,
    target: SparseTargets,
    *,
    mask: torch.Tensor | None = None,
    **options: Unpack[KDOptions],
) -> torch.Tensor:
    """Mean of :func:`kd_loss_per_position` over the positions where ``mask`` is True.

    Args:
        student_logits: ``(..., V_s)``.
        target: ``(..., K)``.
        **options: ``kind``, ``temperature``, ``target_temperature``, ``tail_mode``,
            ``vocab_size``, ``skew``: as :func:`kd_loss_per_position` (same defaults).
        mask: ``(...,)`` bool; masked-out positions are not computed at all (their targets may
            be garbage). Default: all positions.

    Returns:
        Scalar; 0 (with a gradient path) if no position is selected.
    """
    if mask is not None:
        keep = mask.to(torch.bool)
        student_logits = student_logits[keep]
        target = SparseTargets(target.indices[keep], target.logp[keep], target.tail[keep])
    return _masked_mean(kd_loss_per_position(student_logits, target, **options))


def _parse_mixture(
    logits: torch.Tensor, targets: Sequence[SparseTargets], weights: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Check the mixture arguments of :func:`weighted_forward_kl`; returns ``(P, N)`` weights."""
    n, p = len(targets), logits.shape[0]
    w = weights if weights.dim() == 2 else weights.unsqueeze(0).expand(p, -1)
    if tuple(w.shape) != (p, n):
        raise LossConfigError(f"weights must be ({p}, {n}) or ({n},), got {tuple(weights.shape)}")
    if not 0 <= smoothing < 1:
        raise LossConfigError(f"smoothing must be in [0, 1), got {smoothing!r}")
    return w


def weighted_forward_kl(
    student_logits: torch.Tensor,
    targets: Sequence[SparseTargets],
    weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail_mode: TailMode = "spread",
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    smoothing: float = 0.0,
    target_temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 * [sum_i w_i KL(p_i || q) + lam KL(U || q)]``, averaged over positions, no union.

    ``sum_i w_i KL(p_i||q)`` and ``KL(sum_i w_i p_i || q)`` differ by ``H(m) - sum_i w_i H(p_i)``,
    which does not depend on ``q``: the gradients with respect to the student are identical, so
    this is the cheap way to train on any linear operator's target (``weights`` from
    ``aggregator.weights``; ``smoothing`` = ``prior_strength`` for ``mtbkd``). Exact for
    ``tail_mode="spread"``; under ``"bucket"`` each teacher keeps its own bucket, which equals the
    union path only when the teachers keep the same tokens. With ``T != 1`` each teacher is
    re-tempered before mixing (the union path must then aggregate re-tempered inputs).

    Args:
        student_logits: ``(P, V_s)``.
        targets: N sparse targets, ``(P, K_i)``.
        weights: ``(P, N)`` convex weights (gradients flow, e.g. into a gate) or ``(N,)``.
        temperature: ``T > 0``.
        tail_mode: ``"spread"`` (default, exact) or ``"bucket"``.
        mask: ``(P,)`` bool positions to average over.
        vocab_size: As :func:`kd_loss_per_position`.
        smoothing: ``lam`` in ``[0, 1)``; the teacher weights are scaled by ``1 - lam``.
        target_temperature: Temperature the targets are already at (no re-tempering when it
            equals ``temperature``).

    Returns:
        Scalar.

    Raises:
        LossConfigError: bad options or a weight shape that does not match the teachers.
    """
    w = _parse_mixture(student_logits, targets, weights, smoothing)
    if mask is not None:  # drop masked rows first: their targets may be garbage
        keep = mask.to(torch.bool)
        student_logits, w = student_logits[keep], w[keep]
        targets = [SparseTargets(t.indices[keep], t.logp[keep], t.tail[keep]) for t in targets]
    _parse("forward_kl", temperature, target_temperature, 0.1)
    parse_tail_mode(tail_mode)
    z, vocab = _flatten_logits(student_logits, vocab_size)  # (P, V)
    # One student log-softmax (and one backward through it) for all N teachers.
    logq = torch.log_softmax(z / temperature, dim=1)  # (P, V)
    per_teacher = []
    for t in targets:
        flat = _flatten_target(student_logits, t)
        if temperature != target_temperature:
            flat = retemper(flat, temperature / target_temperature, vocab)
        kl = sparse_divergence_from_log_probs(logq, flat, kind="forward_kl", tail_mode=tail_mode)
        per_teacher.append(kl * temperature**2)  # (P,)
    per_teacher_t = torch.stack(per_teacher, dim=1)  # (P, N)
    loss = (1 - smoothing) * (w.to(per_teacher_t.dtype) * per_teacher_t).sum(dim=1)  # (P,)
    if smoothing > 0:
        loss = loss + smoothing * temperature**2 * (-math.log(vocab) - logq.mean(dim=1))
    return _masked_mean(loss)


def hard_label_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy with the true labels, averaged over non-ignored positions.

    Args:
        student_logits: ``(..., V)``.
        labels: ``(...,)`` int64; ``ignore_index`` positions are skipped.
        ignore_index: Label value to skip.

    Returns:
        Scalar; 0 (with a gradient path) if every label is ignored.
    """
    z = student_logits.reshape(-1, student_logits.shape[-1]).float()
    y = labels.reshape(-1)
    total = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")
    return total / (y != ignore_index).sum().clamp(min=1)


def combine(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * kd + (1 - alpha) * ce``.

    Args:
        kd: Scalar KD loss.
        ce: Scalar hard-label loss.
        alpha: Weight of the KD term, in ``[0, 1]``.

    Returns:
        Scalar.

    Raises:
        LossConfigError: ``alpha`` outside ``[0, 1]``.
    """
    if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
        raise LossConfigError(f"alpha must be in [0, 1] (weight of the KD term), got {alpha!r}")
    return alpha * kd + (1 - alpha) * ce
