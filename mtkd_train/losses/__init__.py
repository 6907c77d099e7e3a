"""Distillation losses: sparse-target divergences with exact tail handling, CE, features.

See ``docs/LOSSES.md`` for every formula and how each tail mode is computed.
"""

from mtkd_train.losses._divergence import LOSS_KINDS, LossKind, sparse_divergence
from mtkd_train.losses._feature import FeatureDistiller
from mtkd_train.losses._fused import FusedLoss, FusedOptions, fused_kd_ce_loss, mixture_negentropy
from mtkd_train.losses._fused_head import fused_linear_kd_ce_loss
from mtkd_train.losses._kd import (
    LossConfigError,
    combine,
    hard_label_loss,
    kd_loss,
    kd_loss_per_position,
    weighted_forward_kl,
)

__all__ = [
    "LOSS_KINDS",
    "FeatureDistiller",
    "FusedLoss",
    "FusedOptions",
    "LossConfigError",
    "LossKind",
    "combine",
    "fused_kd_ce_loss",
    "fused_linear_kd_ce_loss",
    "hard_label_loss",
    "kd_loss",
    "kd_loss_per_position",
    "mixture_negentropy",
    "sparse_divergence",
    "weighted_forward_kl",
]
