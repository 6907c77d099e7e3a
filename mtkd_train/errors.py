"""Every public error mtkd_train raises, importable from one place.

Each subclasses a builtin (ValueError, LookupError, ...) so callers may catch either; each message
names the input, the value found, what was expected and how to fix it. `USER_ERRORS` is every
error class of mtkd_train and mtkd_cache: what the CLI turns into a one-line message (anything
else is a bug and keeps its traceback).
"""

import mtkd_cache.errors as _cache_errors
from mtkd_train.aggregate._base import AggregationConfigError, AggregationInputError
from mtkd_train.checkpoint import CheckpointError
from mtkd_train.config import ConfigError
from mtkd_train.data import _errors as _stream
from mtkd_train.losses._kd import LossConfigError
from mtkd_train.metrics import RunWriteError
from mtkd_train.student import StudentError
from mtkd_train.targets import TargetsError
from mtkd_train.uncertainty import UncertaintyError

IncompleteTeacherError = _stream.IncompleteTeacherError
StreamConfigError = _stream.StreamConfigError
StreamStateError = _stream.StreamStateError
TeacherMismatchError = _stream.TeacherMismatchError
TeacherNotFoundError = _stream.TeacherNotFoundError

__all__ = [
    "USER_ERRORS",
    "AggregationConfigError",
    "AggregationInputError",
    "CheckpointError",
    "ConfigError",
    "IncompleteTeacherError",
    "LossConfigError",
    "RunWriteError",
    "StreamConfigError",
    "StreamStateError",
    "StudentError",
    "TargetsError",
    "TeacherMismatchError",
    "TeacherNotFoundError",
    "UncertaintyError",
]

USER_ERRORS: tuple[type[Exception], ...] = tuple(
    [globals()[name] for name in __all__ if name != "USER_ERRORS"]
    + [getattr(_cache_errors, name) for name in _cache_errors.__all__]
)
"""The error classes of mtkd_train and mtkd_cache (for `except USER_ERRORS`)."""
