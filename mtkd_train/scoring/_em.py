"""Mixture weights by EM: the convex teacher weights that maximise held-out likelihood.

Given ``log p_i(y_pos)``, each teacher's log-probability of the true token at P held-out
positions, find ``w`` (one vector, or one per group such as a domain) maximising
``sum_pos log sum_i w_i p_i(y_pos)``. This is the mixture-of-experts likelihood with fixed
experts; EM's update ``w_i <- mean_pos r_pos,i`` with responsibilities
``r_pos,i = w_i p_i / sum_j w_j p_j`` increases it monotonically and converges to the global
optimum (the objective is concave in ``w``). Cost ``O(P N)`` per iteration. Pure tensor code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["EMResult", "fit_mixture_em", "mixture_log_likelihood"]


class EMResult(NamedTuple):
    """Fitted weights ``(G, N)`` (G = 1 without groups), mean log-likelihood per position, iterations."""

    weights: torch.Tensor
    mean_log_likelihood: float
    iterations: int


def mixture_log_likelihood(logp: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Per-position ``log sum_i w_i p_i(y)``.

    Args:
        logp: ``(P, N)`` log-probability of the true token under each teacher (``-inf`` allowed).
        weights: ``(G, N)`` convex weights; row ``groups[pos]`` is used at ``pos``.
        groups: ``(P,)`` int64 group code per position in ``[0, G)``, or ``None`` (``G == 1``).

    Returns:
        ``(P,)``.
    """
    w = weights[groups] if groups is not None else weights[0].expand_as(logp)  # (P, N)
    return torch.logsumexp(logp + w.clamp_min(1e-300).log(), dim=1)


def fit_mixture_em(logp: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int | None = None,
                   *, max_iter: int = 500, tol: float = 1e-9, min_weight: float = 0.0) -> EMResult:
    """Fit global (or per-group) mixture weights by EM.

    Args:
        logp: ``(P, N)`` float log-probability of the true token under each teacher. Positions
            where every teacher gives ``-inf`` carry no information and are skipped.
        groups: Optional ``(P,)`` int64 group per position (e.g. a domain code).
        num_groups: ``G``; default ``groups.max() + 1``. A group with no position keeps uniform
            weights.
        max_iter: Iteration cap.
        tol: Stop when the mean log-likelihood improves by less than this.
        min_weight: Floor on each weight after an update (then renormalised); 0 = plain EM.

    Returns:
        :class:`EMResult` with ``weights`` of shape ``(G, N)``.

    Raises:
        ValueError: ``logp`` not 2-D, or ``groups`` of the wrong shape or negative.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (P, N), got shape {tuple(logp.shape)}")
    p, n = logp.shape
    logp = logp.double()
    keep = torch.isfinite(logp).any(dim=1)
    if groups is not None:
        if groups.shape != (p,) or (p and int(groups.min()) < 0):
            raise ValueError(f"groups must be (P,) = ({p},) non-negative codes, got shape {tuple(groups.shape)}")
        g = groups.long()[keep]
        num_groups = num_groups if num_groups is not None else (int(groups.max()) + 1 if p else 1)
    else:
        g = torch.zeros(int(keep.sum()), dtype=torch.long)
        num_groups = 1
    logp = logp[keep]
    w = torch.full((num_groups, n), 1.0 / n, dtype=torch.float64)
    counts = torch.bincount(g, minlength=num_groups).to(torch.float64)  # (G,)
    prev, it = -math.inf, 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported
        joint = logp + w[g].clamp_min(1e-300).log()  # (P', N)
        ll = torch.logsumexp(joint, dim=1)  # (P',)
        resp = torch.exp(joint - ll.unsqueeze(1))  # (P', N)
        sums = torch.zeros_like(w).index_add_(0, g, resp)  # (G, N)
        new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), w)
        if min_weight > 0:
            new = new.clamp_min(min_weight)
            new = new / new.sum(dim=1, keepdim=True)
        w = new
        cur = float(ll.mean()) if len(ll) else 0.0
        if cur - prev < tol:
            break
        prev = cur
    final = float(mixture_log_likelihood(logp, w, g).mean()) if len(logp) else 0.0
    return EMResult(w.float(), final, it)
