"""The two pooling rules every operator reduces to: linear (mixture) and log-linear (product).

* :func:`linear_pool`: ``m(v) = (1 - lam) * sum_i w_i p_i(v) + lam / V``; the merged tail is the
  same mixture of the teachers' mass outside the union (plus the uniform's). Under ``"spread"``
  every teacher is uniform outside the union, so the mixture is too and the merged target is
  *exactly* the mixture of the spread distributions. Under ``"bucket"`` an unkept union token is
  valued 0 and each teacher's bucket pours into the merged bucket: exactly the mixture of the
  teachers coarsened to the outcome space "union tokens + bucket".
* :func:`log_linear_pool`: ``g(v) = prod_i p_i(v)^(w_i / T) / Z``, always with spread values
  (a product needs a value for every token; a zero would let one teacher's truncation veto a
  token). Outside the union every token has the same value ``prod_i u_i^(w_i/T)``, so the merged
  tail is ``(V - U) * prod_i u_i^(w_i/T) / Z``: exact under the spread reading.

Linear pooling costs ``O(P * sum K_i)`` after the union's sort (:func:`union_mixture`, no
``(P, N, U)`` table); one teacher at weight 1 (single-teacher KD) skips the union: its target is the
merged one. Log-linear costs ``O(P * N * U)`` after :func:`build_union`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mtkd_train.aggregate._union import build_union, union_mixture
from mtkd_train.targets import SparseTargets, TailMode, spread_log_value

__all__ = ["linear_pool", "log_linear_pool"]


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` with ``-inf`` at zero and a finite gradient everywhere it is used."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).log(), -math.inf)


def linear_pool(
    targets: Sequence[SparseTargets],
    weights: torch.Tensor,
    *,
    vocab_size: int,
    tail_mode: TailMode,
    smoothing: float = 0.0,
) -> SparseTargets:
    """Weighted arithmetic mean of N teachers on the union support (optionally smoothed).

    Args:
        targets: One :class:`SparseTargets` per teacher, ``(P, K_i)``.
        weights: ``(P, N)`` convex weights (rows sum to one); gradients flow through them.
        vocab_size: Vocabulary size ``V``.
        tail_mode: ``"spread"`` or ``"bucket"``; see the module docstring.
        smoothing: ``lam`` in ``[0, 1)``, mass mixed in from the uniform distribution over ``V``.

    Returns:
        ``(P, U)`` merged targets; ``tail`` is the merged mass outside the union.
    """
    if len(targets) == 1 and not weights.requires_grad and bool((weights == 1).all()):
        return _one_teacher(targets[0], vocab_size=vocab_size, tail_mode=tail_mode, smoothing=smoothing)
    union = union_mixture(targets, weights, vocab_size=vocab_size, tail_mode=tail_mode)
    merged = union.probs  # (P, U)
    tail = (weights.to(merged.dtype) * union.tail_out).sum(dim=1)  # (P,)
    if smoothing > 0:
        outside = (vocab_size - union.size).to(tail.dtype)  # (P,)
        merged = (1 - smoothing) * merged + union.valid.to(merged.dtype) * (smoothing / vocab_size)
        tail = (1 - smoothing) * tail + smoothing * outside / vocab_size
    logp = torch.where(union.valid, _safe_log(merged), -math.inf)  # (P, U)
    return SparseTargets(union.indices, logp, tail)


def _one_teacher(t: SparseTargets, *, vocab_size: int, tail_mode: TailMode, smoothing: float) -> SparseTargets:
    """:func:`linear_pool` of one teacher at weight 1: its own target (its union is its support), no sort.

    Equal to the union path to float rounding: the same kept tokens (in the teacher's order, padding
    entries left as they are: they hold no token), the same log-probabilities and tail. Under ``"spread"`` a
    row that keeps all ``V`` tokens has no outside, so its tail is dropped, as the union path does.
    """
    kept = t.logp > -math.inf
    tail = t.tail
    outside = vocab_size - kept.sum(dim=-1)  # (P,)
    if tail_mode == "spread":
        tail = torch.where(outside > 0, tail, torch.zeros_like(tail))
    if smoothing == 0:
        return SparseTargets(t.indices, t.logp, tail)
    probs = (1 - smoothing) * t.logp.exp() + smoothing / vocab_size
    return SparseTargets(t.indices, torch.where(kept, _safe_log(probs), -math.inf),
                         (1 - smoothing) * tail + smoothing * outside.to(tail.dtype) / vocab_size)


def log_linear_pool(
    targets: Sequence[SparseTargets],
    weights: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
) -> SparseTargets:
    """Normalised weighted geometric mean (product of experts) on the union support.

    ``g(v) ∝ prod_i p_i(v)^(w_i / T)`` with spread values for unkept tokens. A teacher with weight
    zero is ignored (``0^0 = 1``). Rows where the product is zero everywhere (teachers with zero
    tails and disjoint supports: no token is possible under all of them) have no geometric mean;
    they fall back to the linear mixture with the same weights, so the output is always a
    distribution.

    Args:
        targets: One :class:`SparseTargets` per teacher, ``(P, K_i)``.
        weights: ``(P, N)`` non-negative weights (rows sum to one for unanimity to hold).
        vocab_size: Vocabulary size ``V``.
        temperature: ``T > 0``; the result equals ``retemper(pool at T=1, T)``.

    Returns:
        ``(P, U)`` pooled targets (spread reading of the tail).
    """
    union = build_union(targets, vocab_size=vocab_size, tail_mode="spread")
    alpha = (weights / temperature).to(union.logp.dtype)  # (P, N)
    used = (alpha > 0).unsqueeze(-1)  # (P, N, 1)
    score = torch.where(used, alpha.unsqueeze(-1) * union.logp, 0.0).sum(dim=1)  # (P, U)
    score = torch.where(union.valid, score, -math.inf)
    log_u = torch.stack([spread_log_value(t, vocab_size) for t in targets], dim=1)  # (P, N)
    per_token = torch.where(alpha > 0, alpha * log_u, 0.0).sum(dim=1)  # (P,)
    outside = (vocab_size - union.size).to(per_token.dtype)  # (P,)
    log_out = torch.where(outside > 0, per_token + outside.clamp(min=1).log(), -math.inf)
    log_z = torch.logaddexp(torch.logsumexp(score, dim=1), log_out)  # (P,)
    empty = log_z == -math.inf
    log_z = torch.where(empty, torch.zeros_like(log_z), log_z)
    pooled = SparseTargets(union.indices, score - log_z.unsqueeze(1), torch.exp(log_out - log_z))
    if not bool(empty.any()):
        return pooled
    fallback = linear_pool(targets, weights, vocab_size=vocab_size, tail_mode="spread")
    rows = empty.unsqueeze(1)
    return SparseTargets(
        pooled.indices,
        torch.where(rows, fallback.logp, pooled.logp),
        torch.where(empty, fallback.tail, pooled.tail),
    )
