"""Feature (hidden-state / embedding) distillation, with an optional learned projection per teacher.

``loss = sum_i beta_i * d(P_i h, f_i)`` over the rows in the mask, where ``P_i`` is a
``Linear(d_s, d_t_i)`` (or the identity when the teacher has no projection; the widths must then
agree) and ``d`` is

* ``"mse"``: mean squared error over features, averaged over rows;
* ``"cosine"``: ``1 - cos``, averaged over rows;
* ``"similarity"`` / ``"contrastive"``: relational (``_relational.py``): the rows' in-batch cosine
  similarity matrices are matched (MSE, or row-softmax KL at temperature ``tau``). Widths may differ,
  so no projection is needed.

Several teachers: ``aggregate="per_teacher"`` sums one term per teacher (each its own projection);
``aggregate="mean"`` first averages the teachers' targets (their features, which must share a width,
or for the relational kinds their similarity matrices) into one target matched by one projection.
Cost ``O(P d_s sum_i d_t_i)``, plus ``O(P^2 (d_s + d_t))`` for the relational kinds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd_train.losses._kd import LossConfigError
from mtkd_train.losses._relational import RELATIONAL_KINDS, relational_loss, similarity_matrix

__all__ = ["FEATURE_AGGREGATES", "FEATURE_LOSS_KINDS", "FeatureDistiller"]

FEATURE_LOSS_KINDS = ("mse", "cosine", *RELATIONAL_KINDS)
FEATURE_AGGREGATES = ("per_teacher", "mean")


class FeatureDistiller(nn.Module):
    """Projects the student's hidden states into each teacher's feature space and matches them.

    Args:
        student_dim: Student hidden width ``d_s``.
        teacher_dims: One feature width ``d_t_i`` per teacher.
        kind: One of :data:`FEATURE_LOSS_KINDS`.
        betas: One non-negative weight per teacher (default all 1); with ``aggregate="mean"`` the
            weights of the teachers in the mean.
        projections: Per teacher, whether a learned ``Linear(d_s, d_t_i)`` maps the student into the
            teacher's space (default: all True).
        aggregate: ``"per_teacher"`` or ``"mean"`` (see the module docstring).
        tau: Temperature of ``"contrastive"``.

    Raises:
        LossConfigError: bad widths, kind, betas or aggregate, or an ``mse``/``cosine`` teacher whose
            width differs from the student's without a projection.
    """

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], *, kind: str = "mse",
                 betas: Sequence[float] | None = None, projections: Sequence[bool] | None = None,
                 aggregate: str = "per_teacher", tau: float = 0.05) -> None:
        super().__init__()
        dims = list(teacher_dims)
        if not dims or any(not isinstance(d, int) or d < 1 for d in [student_dim, *dims]):
            raise LossConfigError(f"student_dim={student_dim!r} and teacher_dims={dims!r} must be positive ints "
                                  "(at least one teacher)")
        if kind not in FEATURE_LOSS_KINDS:
            raise LossConfigError(f"kind must be one of {FEATURE_LOSS_KINDS}, got {kind!r}")
        if aggregate not in FEATURE_AGGREGATES:
            raise LossConfigError(f"aggregate must be one of {FEATURE_AGGREGATES}, got {aggregate!r}")
        weights = [1.0] * len(dims) if betas is None else [float(b) for b in betas]
        if len(weights) != len(dims) or any(b < 0 for b in weights):
            raise LossConfigError(f"betas={weights} must hold one non-negative weight per teacher ({len(dims)})")
        proj = [True] * len(dims) if projections is None else [bool(p) for p in projections]
        if len(proj) != len(dims):
            raise LossConfigError(f"projections={proj} must hold one flag per teacher ({len(dims)})")
        mean = aggregate == "mean" and len(dims) > 1
        if mean and kind in ("mse", "cosine") and len(set(dims)) > 1:
            raise LossConfigError(f"aggregate 'mean' averages the teachers' features, whose widths {dims} differ; "
                                  "use aggregate 'per_teacher' (one projection per teacher) or a relational kind")
        if mean:  # one target, one projection (the first teacher's flag)
            dims, proj = dims[:1], proj[:1]
        for i, (d, p) in enumerate(zip(dims, proj)):
            if kind in ("mse", "cosine") and not p and d != student_dim:
                raise LossConfigError(f"teacher {i} has {d}-wide features and the student {student_dim}-wide hidden "
                                      f"states, and no projection was given; enable the projection for it or use a "
                                      f"student of width {d}")
        self.kind, self.aggregate, self.tau = kind, aggregate, tau
        self.betas = tuple(weights)
        self.teacher_dims = tuple(int(d) for d in teacher_dims)
        self.projections = nn.ModuleList(nn.Linear(student_dim, d) if p else nn.Identity()
                                         for d, p in zip(dims, proj))

    def forward(self, student_hidden: torch.Tensor | Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted feature-matching loss.

        Args:
            student_hidden: ``(P, d_s)``, or one ``(P, d_s)`` per teacher (each teacher matched
                to its own student layer).
            teacher_features: One ``(P, d_t_i)`` tensor per teacher (no gradient needed).
            mask: ``(P,)`` bool rows to use (default all).

        Returns:
            Scalar loss; 0 if the mask selects nothing.

        Raises:
            LossConfigError: wrong number of teachers or a feature shape that does not fit.
        """
        n = len(self.teacher_dims)
        if len(teacher_features) != n:
            raise LossConfigError(f"got features from {len(teacher_features)} teachers, built for {n}")
        hiddens = [student_hidden] * n if isinstance(student_hidden, torch.Tensor) else list(student_hidden)
        if len(hiddens) != n:
            raise LossConfigError(f"got {len(hiddens)} student hidden states for {n} teachers")
        keep = None if mask is None else mask.to(torch.bool)
        hs, fs = [], []
        for i, (feats, h) in enumerate(zip(teacher_features, hiddens)):
            if feats.shape[-1] != self.teacher_dims[i] or feats.shape[0] != h.shape[0]:
                raise LossConfigError(f"teacher {i} features have shape {tuple(feats.shape)}, expected "
                                      f"({h.shape[0]}, {self.teacher_dims[i]})")
            hs.append(h if keep is None else h[keep])  # (M, d_s)
            fs.append((feats if keep is None else feats[keep]).to(hs[-1].dtype))  # (M, d_t)
        if self.aggregate == "mean" and n > 1:
            return self._mean_target(hs[0], fs)
        total = hs[0].new_zeros(())
        for proj, beta, h, f in zip(self.projections, self.betas, hs, fs):
            total = total + beta * self._distance(proj(h), f)
        return total

    def _distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(M, d) vs (M, d') -> scalar, averaged over the M rows."""
        if pred.shape[0] == 0:
            return pred.sum() * 0.0
        if self.kind == "mse":
            return (pred - target).pow(2).mean(dim=1).mean()
        if self.kind == "cosine":
            return (1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8)).mean()
        return relational_loss(pred, target, kind=self.kind, tau=self.tau)  # type: ignore[arg-type]

    def _mean_target(self, h: torch.Tensor, fs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One projection against the beta-weighted mean target of every teacher."""
        w = torch.tensor(self.betas, dtype=h.dtype, device=h.device)
        w = w / w.sum().clamp_min(1e-12)
        pred = self.projections[0](h)
        if self.kind in ("mse", "cosine"):
            return self._distance(pred, sum(wi * f for wi, f in zip(w, fs)))  # type: ignore[arg-type]
        if pred.shape[0] < 2:
            return pred.sum() * 0.0
        target = sum(wi * similarity_matrix(f) for wi, f in zip(w, fs))  # (M, M) mean similarity
        return relational_loss(pred, target, kind=self.kind, tau=self.tau, target_is_similarity=True)  # type: ignore[arg-type]
