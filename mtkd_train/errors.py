"""Every public error mtkd_train raises, importable from one place.

Each subclasses a builtin (ValueError, LookupError, ...) so callers may catch either; each message
names the input, the value found, what was expected and how to fix it.
"""

from mtkd_train.aggregate._base import AggregationConfigError, AggregationInputError
from mtkd_train.checkpoint import CheckpointError
from mtkd_train.config import ConfigError
from mtkd_train.data._errors import (
    IncompleteTeacherError,
    StreamConfigError,
    StreamStateError,
    TeacherMismatchError,
    TeacherNotFoundError,
)
from mtkd_train.losses._kd import LossConfigError
from mtkd_train.student import StudentError
from mtkd_train.targets import TargetsError
from mtkd_train.uncertainty import UncertaintyError

__all__ = [
    "AggregationConfigError",
    "AggregationInputError",
    "CheckpointError",
    "ConfigError",
    "IncompleteTeacherError",
    "LossConfigError",
    "StreamConfigError",
    "StreamStateError",
    "StudentError",
    "TargetsError",
    "TeacherMismatchError",
    "TeacherNotFoundError",
    "UncertaintyError",
]
