"""Multi-teacher aggregation operators over sparse targets (pure tensor code).

Every operator takes N teachers' :class:`~mtkd_train.targets.SparseTargets` of shapes
``(P, K_i)`` and returns one merged target on the per-position union of their supports. Build one
by name with :func:`build_aggregator`; see ``docs/AGGREGATION.md`` for the formulas, the tail
handling and which axioms each operator satisfies.
"""

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    Aggregator,
    OperatorSetup,
)
from mtkd_train.aggregate._gate import (
    GateAggregator,
    GateNetwork,
    gate_entropy_regularizer,
    gate_scoring_loss,
)
from mtkd_train.aggregate._linear import LogLinearAggregator, MeanAggregator
from mtkd_train.aggregate._pooling import linear_pool, log_linear_pool
from mtkd_train.aggregate._registry import (
    AGGREGATORS,
    build_aggregator,
    make_aggregator,
    operator_context,
)
from mtkd_train.aggregate._routing import RoutingAggregator
from mtkd_train.aggregate._scored import (
    ConfidenceAggregator,
    EntropyAggregator,
    LabelAwareAggregator,
    MTBKDAggregator,
    label_log_prob,
    max_prob,
    teacher_entropy,
)
from mtkd_train.aggregate._union import UnionTargets, build_union

__all__ = [
    "AGGREGATORS",
    "AggregationConfigError",
    "AggregationContext",
    "AggregationInputError",
    "Aggregator",
    "ConfidenceAggregator",
    "EntropyAggregator",
    "GateAggregator",
    "GateNetwork",
    "LabelAwareAggregator",
    "LogLinearAggregator",
    "MTBKDAggregator",
    "MeanAggregator",
    "OperatorSetup",
    "RoutingAggregator",
    "UnionTargets",
    "build_aggregator",
    "build_union",
    "gate_entropy_regularizer",
    "gate_scoring_loss",
    "label_log_prob",
    "linear_pool",
    "log_linear_pool",
    "make_aggregator",
    "max_prob",
    "operator_context",
    "teacher_entropy",
]
