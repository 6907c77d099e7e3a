"""Distillation losses: sparse-target divergences with exact tail handling, CE, features.

See ``docs/LOSSES.md`` for every formula and how each tail mode is computed.
"""

from mtkd_train.losses._divergence import LOSS_KINDS, LossKind, sparse_divergence
from mtkd_train.losses._feature import FEATURE_AGGREGATES, FEATURE_LOSS_KINDS, FeatureDistiller
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
from mtkd_train.losses._kernels import KERNELS
from mtkd_train.losses._relational import RELATIONAL_KINDS, relational_loss, similarity_matrix

__all__ = [
    "FEATURE_AGGREGATES",
    "FEATURE_LOSS_KINDS",
    "KERNELS",
    "LOSS_KINDS",
    "RELATIONAL_KINDS",
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
    "relational_loss",
    "similarity_matrix",
    "sparse_divergence",
    "weighted_forward_kl",
]
