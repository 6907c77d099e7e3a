"""The settings of one teacher run (`RunConfig`) and the checks that run before anything is written.

A teacher name becomes a folder (`teachers/<name>`) on every store, so it is held to a portable
set of characters. The model string and factory kwargs are recorded in the teacher's settings
and compared on resume, so they are normalised first: a local folder by its resolved absolute
path (``./a`` and ``a`` are one model), kwargs by a canonical JSON round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd_cache.format.meta import TargetSpec, parse_pool

__all__ = ["RunConfig", "canonical_kwargs", "model_key", "parse_new_teacher_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def parse_new_teacher_name(name: str) -> str:
    """Return `name` if it is a portable folder name, else raise `ValueError` naming `--teacher`.

    Stricter than `format.meta.parse_teacher_name`, which is the rule for reading: a cache written
    before this check may hold a name (e.g. with a space) that stays readable but is no longer
    accepted for a new teacher.

    Allowed: letters, digits, '_', '.', '-'; first character a letter or digit; no '..'; at most
    128 characters. Path separators (`/`, `\\`), drive letters and relative parts are refused.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"--teacher {name!r}: use a plain name such as 'qwen7b' (letters, digits, '_', '.', '-'; "
            f"starting with a letter or digit; no '..'; at most 128 characters)")
    return name


def model_key(model: str) -> str:
    """The model as recorded in the settings: a local path resolved and absolute, anything else as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def canonical_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Factory kwargs as they round-trip through JSON (sorted keys, tuples as lists); None if empty.

    Raises:
        ValueError: a value JSON cannot represent, so it could not be compared on resume.
    """
    if not kwargs:
        return None
    try:
        return dict(json.loads(json.dumps(dict(kwargs), sort_keys=True, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model-kwargs must be JSON values (they are stored and compared on resume): {e}") from e


@dataclass(frozen=True)
class RunConfig:
    """Settings of one `run_teacher` call (the CLI flags of `mtkd-cache run`)."""

    teacher: str
    """Name of the teacher group in the cache (`--teacher`)."""
    model: str
    """HF model folder or id, or a `package.module:function` factory (`--model`)."""
    top_k: int | None = None
    """Keep the k most likely tokens per position plus the exact tail mass (`--top-k`); with neither
    this nor `samples`, 64 for a teacher with a head and no targets (features only) for one without."""
    samples: int | None = None
    """Instead of top-k, draw this many tokens per position and store counts (`--samples`)."""
    features: tuple[int, ...] = ()
    """Hidden-state layers to store (`--features`, HF indices: 0 = embeddings, -1 = last)."""
    pool: str = "none"
    """`none` keeps features per position; `mean`, `cls`, `max`, ... (`+`-joined, optional `+normalize`)
    pool them per sample; `auto` reads the model folder's `1_Pooling/config.json` (`--pool`)."""
    feature_dtype: str = "float16"
    """`float16` or `int8` (per-row scale) for stored features (`--feature-dtype`)."""
    temperature: float = 1.0
    """Capture temperature of the stored distribution (`--temperature`)."""
    value_codec: str = "u8log"
    """`u8log` (8-bit log-prob code), `fp16` or `fp32` (`--values`)."""
    logp_step: float = 1.0 / 16.0
    """Grid step in nats of the `u8log` code (`--logp-step`)."""
    tail_dtype: str = "float16"
    """Storage type of the tail mass (`--tail-dtype`)."""
    compression: str = "zstd"
    """`zstd` or `blosc` (`--compression`)."""
    compression_level: int = 3
    """Compression level (`--compression-level`)."""
    batch_size: int = 8
    """Samples per forward pass (`--batch-size`)."""
    max_tokens: int | None = None
    """Optional budget of padded tokens per batch (`--max-tokens`)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N` (`--device`)."""
    device_map: str | None = None
    """Spread a Hugging Face teacher over several devices with accelerate (`--device-map auto`); under
    torchrun each rank owns an equal block of the node's GPUs. None: the whole teacher on `device`."""
    max_memory: Mapping[int | str, int | str] | None = None
    """Per-device budget for `device_map` (`--max-memory 0=40GiB,1=40GiB,cpu=200GiB`); None: the free
    memory of the rank's GPUs."""
    dtype: str = "auto"
    """`auto`, `bf16`, `fp16` or `fp32` (`--dtype`)."""
    seed: int = 0
    """Seed of sampled targets; draws depend only on (seed, chunk) (`--seed`)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (`--trust-remote-code`)."""
    overwrite: bool = False
    """Replace a teacher group stored with other settings (`--overwrite`)."""

    def __post_init__(self) -> None:
        if self.top_k is not None and self.samples is not None:
            raise ValueError("give exactly one of --top-k K or --samples N, not both (neither: top-k 64, or features "
                             "only for a teacher without a head)")
        if self.pool != "auto":
            try:
                parse_pool(self.pool)
            except ValueError as e:
                raise ValueError(f"--pool {self.pool!r}: use none, auto, mean, cls, max, mean_sqrt_len, weightedmean "
                                 f"or lasttoken ('+'-joined, optionally '+normalize', e.g. mean+normalize)") from e
        if self.feature_dtype not in ("float16", "int8"):
            raise ValueError(f"--feature-dtype must be 'float16' or 'int8', got {self.feature_dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        parse_new_teacher_name(self.teacher)
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"--device-map must be auto, balanced, balanced_low_0 or sequential, got {self.device_map!r}")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("--max-memory only applies with --device-map; add --device-map auto or drop it")

    @property
    def target(self) -> TargetSpec:
        if self.samples is None:
            return TargetSpec("topk", k=self.top_k or 64, temperature=self.temperature, seed=self.seed)
        return TargetSpec("sample", draws=self.samples, temperature=self.temperature, seed=self.seed)
