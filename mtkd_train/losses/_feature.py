"""Feature (hidden-state) distillation with a learned projection per teacher.

``loss = sum_i beta_i * mean_{p in mask} d(W_i h_p, f_{i,p})`` where ``W_i`` is a
``Linear(d_s, d_t_i)`` and ``d`` is the mean squared error over features (``"mse"``) or
``1 - cos`` (``"cosine"``). Cost ``O(P * d_s * sum_i d_t_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtkd_train.losses._kd import LossConfigError

__all__ = ["FeatureDistiller"]

_KINDS = ("mse", "cosine")


class FeatureDistiller(nn.Module):
    """Projects the student's hidden states into each teacher's feature space and matches them.

    Args:
        student_dim: Student hidden width ``d_s``.
        teacher_dims: One feature width ``d_t_i`` per teacher.
        kind: ``"mse"`` or ``"cosine"``.
        betas: One non-negative weight per teacher (default all 1).

    Raises:
        LossConfigError: bad widths, kind or betas.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dims: Sequence[int],
        *,
        kind: str = "mse",
        betas: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        dims = list(teacher_dims)
        if not dims or any(not isinstance(d, int) or d < 1 for d in [student_dim, *dims]):
            raise LossConfigError(
                f"student_dim={student_dim!r} and teacher_dims={dims!r} must be positive ints "
                "(at least one teacher)"
            )
        if kind not in _KINDS:
            raise LossConfigError(f"kind must be one of {_KINDS}, got {kind!r}")
        weights = [1.0] * len(dims) if betas is None else [float(b) for b in betas]
        if len(weights) != len(dims) or any(b < 0 for b in weights):
            raise LossConfigError(
                f"betas={weights} must hold one non-negative weight per teacher ({len(dims)})"
            )
        self.kind = kind
        self.betas = tuple(weights)
        self.teacher_dims = tuple(dims)
        self.projections = nn.ModuleList(nn.Linear(student_dim, d) for d in dims)

    def forward(
        self,
        student_hidden: torch.Tensor | Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted feature-matching loss.

        Args:
            student_hidden: ``(P, d_s)``, or one ``(P, d_s)`` per teacher (each teacher matched
                to its own student layer).
            teacher_features: One ``(P, d_t_i)`` tensor per teacher (no gradient needed).
            mask: ``(P,)`` bool positions to average over (default all).

        Returns:
            Scalar ``sum_i beta_i * loss_i``; 0 if the mask selects nothing.

        Raises:
            LossConfigError: wrong number of teachers or a feature shape that does not fit.
        """
        if len(teacher_features) != len(self.projections):
            raise LossConfigError(
                f"got features from {len(teacher_features)} teachers, built for "
                f"{len(self.projections)}"
            )
        hiddens = (
            [student_hidden] * len(teacher_features)
            if isinstance(student_hidden, torch.Tensor)
            else list(student_hidden)
        )
        if len(hiddens) != len(teacher_features):
            raise LossConfigError(
                f"got {len(hiddens)} student hidden states for {len(teacher_features)} teachers"
            )
        keep = None if mask is None else mask.to(torch.bool)
        total = hiddens[0].new_zeros(())
        for i, (proj, feats, hs) in enumerate(zip(self.projections, teacher_features, hiddens)):
            if feats.shape[-1] != self.teacher_dims[i] or feats.shape[0] != hs.shape[0]:
                raise LossConfigError(
                    f"teacher {i} features have shape {tuple(feats.shape)}, expected "
                    f"({hs.shape[0]}, {self.teacher_dims[i]})"
                )
            h = hs if keep is None else hs[keep]  # (M, d_s)
            f = (feats if keep is None else feats[keep]).to(h.dtype)  # (M, d_t)
            pred = proj(h)  # (M, d_t)
            if self.kind == "mse":
                per_pos = (pred - f).pow(2).mean(dim=1)
            else:
                per_pos = 1 - F.cosine_similarity(pred, f, dim=1, eps=1e-8)
            total = total + self.betas[i] * per_pos.sum() / max(per_pos.numel(), 1)
        return total
