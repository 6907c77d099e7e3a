"""Choose the aggregation operator and its weights from the cache, before training.

The open problem the aggregation-axioms paper names (choosing the operator without a sweep) is
cheap here: every teacher's targets on held-out positions are already stored. :func:`rank_operators`
scores each operator's aggregate by its held-out NLL of the true token and its ECE, with mixture
weights fitted by EM (:func:`fit_mixture_em`, global and per domain) and ``tau`` by a 1-D search;
:func:`choose` returns the best as ``mtkd-train`` config keys. CLI: ``mtkd-score``.
"""

from mtkd_train.scoring._choose import choose, choose_aggregate, score_cache
from mtkd_train.scoring._em import EMResult, fit_mixture_em, mixture_log_likelihood
from mtkd_train.scoring._heldout import collect_heldout
from mtkd_train.scoring._score import (
    HeldOut,
    ScoreRow,
    rank_operators,
    score_operator,
    teacher_label_logp,
)

__all__ = [
    "EMResult",
    "HeldOut",
    "ScoreRow",
    "choose",
    "choose_aggregate",
    "collect_heldout",
    "fit_mixture_em",
    "mixture_log_likelihood",
    "rank_operators",
    "score_cache",
    "score_operator",
    "teacher_label_logp",
]
