"""The training data stream: cached teacher targets as batches, resumable and bounded in memory.

Public API:
    validate_teachers -> refuse teachers that cannot be distilled together (before any step);
    SampleOrder -> the deterministic, worker- and rank-independent sample order of each epoch;
    CachedDistillDataset -> the IterableDataset of batches (`DataLoader(ds, batch_size=None)`),
        with `consumed` / `state_dict` / `load_state_dict` for exact resume;
    StreamState -> (epoch, samples_consumed); InMemoryTargets -> one pass held in memory.
"""

from mtkd_train.data._chunks import ChunkCache, ChunkCacheStats
from mtkd_train.data._collate import BatchBuilder, BatchSpec
from mtkd_train.data._dataset import BatchStream, CachedDistillDataset, StreamState
from mtkd_train.data._errors import (
    IncompleteTeacherError,
    StreamConfigError,
    StreamStateError,
    TeacherMismatchError,
    TeacherNotFoundError,
)
from mtkd_train.data._memory import InMemoryTargets
from mtkd_train.data._order import SampleOrder
from mtkd_train.data._validate import validate_teachers

__all__ = [
    "BatchBuilder",
    "BatchSpec",
    "BatchStream",
    "CachedDistillDataset",
    "ChunkCache",
    "ChunkCacheStats",
    "InMemoryTargets",
    "IncompleteTeacherError",
    "SampleOrder",
    "StreamConfigError",
    "StreamState",
    "StreamStateError",
    "TeacherMismatchError",
    "TeacherNotFoundError",
    "validate_teachers",
]
