"""Relational feature distillation: match in-batch similarity structure, not coordinates.

For M embeddings in a batch, the student's and the teacher's cosine-similarity matrices
``S = n(x) n(x)^T`` (``n`` = L2 normalisation) are compared; widths may differ, so no projection
is needed (the structure is compared within each space).

* ``"similarity"``: mean squared difference of the off-diagonal entries of ``S_s`` and ``S_t``
  (relational KD, as in MiniLM-style and RKD distance/angle losses).
* ``"contrastive"``: per row, ``KL(softmax(S_t / tau) || softmax(S_s / tau))`` over the other
  M - 1 items (the InfoNCE-style distribution of which item is most similar), averaged over rows.

Pure tensor code, ``O(M^2 (D_s + D_t))``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mtkd_train.losses._kd import LossConfigError

__all__ = ["RELATIONAL_KINDS", "relational_loss", "similarity_matrix"]

RELATIONAL_KINDS = ("similarity", "contrastive")


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """In-batch cosine similarities ``(M, D) -> (M, M)`` in float32."""
    n = F.normalize(x.float(), p=2, dim=-1, eps=1e-8)
    return n @ n.T  # (M, M)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                    kind: Literal["similarity", "contrastive"] = "similarity", tau: float = 0.05,
                    target_is_similarity: bool = False) -> torch.Tensor:
    """Relational distillation loss between two batches of embeddings of the same M items.

    Args:
        student: ``(M, D_s)``.
        teacher: ``(M, D_t)`` (no gradient needed), or with ``target_is_similarity`` an ``(M, M)``
            similarity matrix already (e.g. the mean of several teachers').
        kind: ``"similarity"`` or ``"contrastive"``.
        tau: Softmax temperature of ``"contrastive"`` (> 0).

    Returns:
        Scalar; 0 when ``M < 2`` (no pair to compare).

    Raises:
        LossConfigError: bad kind, tau or shapes.
    """
    if kind not in RELATIONAL_KINDS:
        raise LossConfigError(f"relational kind must be one of {RELATIONAL_KINDS}, got {kind!r}")
    if not tau > 0:
        raise LossConfigError(f"tau must be > 0, got {tau!r}")
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0] or (
            target_is_similarity and teacher.shape[1] != teacher.shape[0]):
        raise LossConfigError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be "
                              "(M, D_s) and (M, D_t) over the same M items")
    m = student.shape[0]
    if m < 2:
        return student.sum() * 0.0
    s = similarity_matrix(student)
    t = teacher.detach().float() if target_is_similarity else similarity_matrix(teacher.detach())
    off = ~torch.eye(m, dtype=torch.bool, device=student.device)
    if kind == "similarity":
        return (s - t)[off].pow(2).mean()
    s_off, t_off = s[off].view(m, m - 1), t[off].view(m, m - 1)
    log_q = torch.log_softmax(s_off / tau, dim=-1)
    log_p = torch.log_softmax(t_off / tau, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
