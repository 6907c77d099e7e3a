"""mtkd_cache: precompute teacher soft labels once into a chunked, compressed, versioned cache.

Public API (the CLI `mtkd-cache` calls the same functions):
    prepare / prepare_arrays -> write the inputs; run_teacher -> store one teacher's targets;
    open_cache -> read (every read checked); verify_cache (repair=True drops damaged chunks) /
    inspect_cache -> check and describe; migrate_cache -> upgrade an older format in place.
The on-disk format is specified in docs/FORMAT.md. This package never imports mtkd_train.
"""

from mtkd_cache._version import FORMAT_VERSION, __version__
from mtkd_cache.errors import (
    CacheCorruptError,
    CacheExistsError,
    CacheFormatError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheWriteError,
    InputDataError,
)
from mtkd_cache.format.meta import (
    ChunkGrid,
    Compressor,
    FeatureSpec,
    InputsMeta,
    Manifest,
    TargetSpec,
    TeacherMeta,
    TeacherStats,
    TokenizerInfo,
    ValueEncoding,
)
from mtkd_cache.format.reader import CacheReader, ChunkData, SampledBlock, TopkBlock, open_cache
from mtkd_cache.ops.inspect import inspect_cache
from mtkd_cache.ops.migrate import MigrateReport, migrate_cache
from mtkd_cache.ops.verify import VerifyReport, verify_cache
from mtkd_cache.precompute.prepare import prepare, prepare_arrays
from mtkd_cache.precompute.run import RunConfig, run_teacher

__all__ = [
    "FORMAT_VERSION",
    "CacheCorruptError",
    "CacheExistsError",
    "CacheFormatError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "CacheReader",
    "CacheWriteError",
    "ChunkData",
    "ChunkGrid",
    "Compressor",
    "FeatureSpec",
    "InputDataError",
    "InputsMeta",
    "Manifest",
    "MigrateReport",
    "RunConfig",
    "SampledBlock",
    "TargetSpec",
    "TeacherMeta",
    "TeacherStats",
    "TokenizerInfo",
    "TopkBlock",
    "ValueEncoding",
    "VerifyReport",
    "__version__",
    "inspect_cache",
    "migrate_cache",
    "open_cache",
    "prepare",
    "prepare_arrays",
    "run_teacher",
    "verify_cache",
]
