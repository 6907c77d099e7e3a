"""Divergences between a sparse target and dense student logits, with exact tail handling.

Every divergence here is a sum of per-outcome terms ``f(p_o, q_o)``:

==================  ==============================================================
``forward_kl``      ``p log(p / q)``
``reverse_kl``      ``q log(q / p)``            (``+inf`` where ``p = 0 < q``)
``js``              ``(p log(p/m) + q log(q/m)) / 2``, ``m = (p + q) / 2``
``tv``              ``|p - q| / 2``
``skew_kl``         ``p log(p / (a p + (1 - a) q))``       (DistiLLM's SKL, ``a`` = skew)
``skew_reverse_kl`` ``q log(q / (a q + (1 - a) p))``       (DistiLLM's SRKL)
==================  ==============================================================

so the two tail modes are two choices of outcome space, both computed exactly:

* ``"spread"``: outcomes are the ``V`` tokens; an unkept token has ``p = u = tail / (V - K)``.
  Kept terms are gathered ``(P, K)``; unkept terms are one masked dense pass ``(P, V)`` (forward
  KL needs only ``sum`` of the masked ``log q``).
* ``"bucket"``: outcomes are the kept tokens plus one bucket with ``p = tail`` and
  ``q = 1 - sum_kept q``, the latter computed as a masked ``logsumexp`` of the logits (no
  cancellation in ``1 - sum``).

Padding entries (``logp = -inf``) are not outcomes. Cost ``O(P * V)``, like the softmax itself.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mtkd_train.targets import SparseTargets, TailMode, spread_log_value

__all__ = ["LOSS_KINDS", "LossKind", "sparse_divergence", "sparse_divergence_from_log_probs", "support_mask"]

LossKind = Literal["forward_kl", "reverse_kl", "js", "tv", "skew_kl", "skew_reverse_kl"]
LOSS_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "js", "tv", "skew_kl", "skew_reverse_kl")


def _p_log_ratio(p: torch.Tensor, logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """``p * (log p - log r)`` with ``0 log 0 = 0`` and no NaN gradients where ``p = 0``."""
    pos = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    diff = torch.where(pos, logp, zero) - torch.where(pos, logr, zero)
    return torch.where(pos, p * diff, zero)


def _terms(kind: str, logp: torch.Tensor, logq: torch.Tensor, skew: float) -> torch.Tensor:
    """Per-outcome terms ``f(p, q)`` from log-probabilities (broadcasting)."""
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":
        return _p_log_ratio(p, logp, logq)
    if kind == "reverse_kl":
        return _p_log_ratio(q, logq, logp)
    if kind == "tv":
        return 0.5 * (p - q).abs()
    if kind == "js":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (_p_log_ratio(p, logp, logm) + _p_log_ratio(q, logq, logm))
    log_a = math.log(skew) if skew > 0 else -math.inf
    log_b = math.log1p(-skew)
    if kind == "skew_kl":
        return _p_log_ratio(p, logp, torch.logaddexp(logp + log_a, logq + log_b))
    return _p_log_ratio(q, logq, torch.logaddexp(logq + log_a, logp + log_b))


def support_mask(target: SparseTargets, vocab_size: int) -> torch.Tensor:
    """``(P, V)`` bool: token kept (non-padding) by the target row. Duplicate-safe."""
    kept = target.logp > -math.inf  # (P, K)
    # Padding entries write to a spare column V, so a True is never overwritten by padding.
    idx = torch.where(kept, target.indices, vocab_size)
    hits = torch.zeros((target.logp.shape[0], vocab_size + 1), dtype=torch.bool, device=kept.device)
    return hits.scatter_(1, idx, True)[:, :vocab_size]


def sparse_divergence(
    logits: torch.Tensor,
    target: SparseTargets,
    *,
    kind: str,
    tail_mode: TailMode,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between a sparse target and ``softmax(logits)``.

    Args:
        logits: ``(P, V)`` float32 student logits (already divided by the temperature).
        target: ``(P, K)`` sparse target on the same vocabulary.
        kind: One of :data:`LOSS_KINDS`; the formula is ``sum_o f(p_o, q_o)`` (module table).
        tail_mode: ``"spread"`` or ``"bucket"`` (module docstring).
        skew: ``a`` for the skew divergences, in ``[0, 1)``.

    Returns:
        ``(P,)`` divergences (``+inf`` where the divergence is infinite).
    """
    return sparse_divergence_from_log_probs(
        torch.log_softmax(logits, dim=1), target, kind=kind, tail_mode=tail_mode, skew=skew
    )


def sparse_divergence_from_log_probs(
    logq: torch.Tensor,
    target: SparseTargets,
    *,
    kind: str,
    tail_mode: TailMode,
    skew: float = 0.1,
) -> torch.Tensor:
    """:func:`sparse_divergence` from the student's log-probabilities ``log_softmax(logits)``.

    Several targets (one per teacher) can then share one ``(P, V)`` log-softmax and its backward.

    Args:
        logq: ``(P, V)`` float32 student log-probabilities (at the distillation temperature).
        target, kind, tail_mode, skew: as :func:`sparse_divergence`.

    Returns:
        ``(P,)`` divergences.
    """
    vocab = logq.shape[1]
    kept = target.logp > -math.inf  # (P, K)
    safe_idx = torch.where(kept, target.indices, torch.zeros_like(target.indices))
    logq_kept = logq.gather(1, safe_idx)  # (P, K)
    # Padding entries are not outcomes: give them p = q so their (masked) terms and gradients are 0.
    logp_kept = torch.where(kept, target.logp.to(logq.dtype), logq_kept.detach())
    kept_terms = torch.where(kept, _terms(kind, logp_kept, logq_kept, skew), 0.0).sum(1)  # (P,)
    in_s = support_mask(target, vocab)  # (P, V)
    if tail_mode == "bucket":
        tail = target.tail.to(logq.dtype)
        log_tail = torch.where(tail > 0, tail.clamp(min=1e-45).log(), -math.inf)  # (P,)
        # A row whose support is the whole vocabulary has no bucket outcome for the student to
        # match: its tail (mass the teachers put on tokens others kept) is left out of the loss.
        full = in_s.all(dim=1)
        bucket = _terms(kind, log_tail, _log_rest_mass(logq, in_s), skew)
        return kept_terms + torch.where(full, torch.zeros_like(bucket), bucket)
    log_u = spread_log_value(target, vocab).to(logq.dtype)  # (P,)
    if kind == "forward_kl":
        # sum_{v not kept} u (log u - log q_v) = tail_eff * log u - u * sum_{v not kept} log q_v
        has = log_u > -math.inf
        safe_log_u = torch.where(has, log_u, 0.0)
        u = torch.where(has, safe_log_u.exp(), 0.0)
        unkept_count = (~in_s).sum(1).to(logq.dtype)
        rest_logq = logq.masked_fill(in_s, 0.0).sum(1)  # (P,)
        return kept_terms + u * (unkept_count * safe_log_u - rest_logq)
    logp_dense = torch.where(in_s, logq.detach(), log_u.unsqueeze(1))  # (P, V)
    return kept_terms + _terms(kind, logp_dense, logq, skew).masked_fill(in_s, 0.0).sum(1)


def _log_rest_mass(logq: torch.Tensor, in_s: torch.Tensor) -> torch.Tensor:
    """``(P,)`` log of the student's mass outside the kept set, ``-inf`` if nothing is outside.

    A log-sum-exp of the masked log-probabilities (no ``1 - sum_kept q``, which cancels when the
    rest is tiny); ``logq`` is already normalised, so no second log-sum-exp over the logits.
    """
    full = in_s.all(dim=1)  # (P,) every token kept: no rest (and no NaN gradient from it)
    masked = logq.masked_fill(in_s & ~full.unsqueeze(1), -math.inf)  # (P, V)
    return torch.where(full, -math.inf, torch.logsumexp(masked, dim=1))
