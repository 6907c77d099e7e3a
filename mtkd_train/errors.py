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
    "one_line",
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
    [globals()[name] for name in __all__ if name not in ("USER_ERRORS", "one_line")]
    + [getattr(_cache_errors, name) for name in _cache_errors.__all__]
)
"""The error classes of mtkd_train and mtkd_cache (for `except USER_ERRORS`)."""


def one_line(error: BaseException) -> str:
    """`Name: message` of a user error, on one line.

    An error raised in a DataLoader worker comes back re-raised by torch with the worker's whole
    traceback in its message ("Caught X in DataLoader worker process 0. Original Traceback ...");
    the user needs only the last line of it, which is the original error and its message.
    """
    text = str(error)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        name, sep, message = last.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}" if sep else last
    return f"{type(error).__name__}: {text}"
