"""Metadata of a cache: frozen dataclasses that round-trip through JSON.

Every `from_dict` validates what it reads and names the field, the value found and what was
expected, so that a reader never guesses (docs/FORMAT.md is the contract).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from mtkd_cache._version import FORMAT_NAME, FORMAT_VERSION
from mtkd_cache.errors import CacheFormatError

__all__ = [
    "ChunkGrid",
    "FeatureSpec",
    "InputsMeta",
    "Manifest",
    "TargetSpec",
    "TeacherMeta",
    "TokenizerInfo",
    "ValueEncoding",
]

T = TypeVar("T")


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CacheFormatError(f"{where}: field {key!r} is missing; the file is corrupt or not an mtkd cache")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CacheFormatError(
            f"{where}: field {key!r} is {value!r} ({type(value).__name__}), expected {typ}"
        )
    return value


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise CacheFormatError(f"{where}: {value!r} is not one of {allowed}")
    return str(value)


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclass(frozen=True)
class ChunkGrid:
    """How rows are grouped into chunks, the unit of work, commit, checksum and shard.

    Chunk `c` holds samples `[c*chunk_samples, (c+1)*chunk_samples)` and the position rows
    `[c*chunk_positions, (c+1)*chunk_positions)`. A sample's positions are contiguous inside its
    chunk's region; rows of a region past its last sample are padding (fill value 0).
    """

    num_samples: int
    num_chunks: int
    chunk_samples: int
    chunk_positions: int
    inner_samples: int
    inner_positions: int

    def __post_init__(self) -> None:
        for name in ("chunk_samples", "chunk_positions", "inner_samples", "inner_positions"):
            if getattr(self, name) <= 0:
                raise CacheFormatError(f"chunk grid: {name} must be positive, got {getattr(self, name)}")
        if self.chunk_samples % self.inner_samples or self.chunk_positions % self.inner_positions:
            raise CacheFormatError("chunk grid: inner chunks must divide the chunk (shard) shape")

    @property
    def total_positions(self) -> int:
        return self.num_chunks * self.chunk_positions

    @property
    def total_sample_rows(self) -> int:
        return self.num_chunks * self.chunk_samples

    def sample_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_samples
        return start, min(start + self.chunk_samples, self.num_samples)

    def position_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_positions, (chunk + 1) * self.chunk_positions

    def chunk_of_sample(self, sample: int) -> int:
        return sample // self.chunk_samples

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkGrid:
        w = "inputs.json grid"
        return cls(**{f.name: _req(d, f.name, int, w) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the inputs were made with; its files are copied into `inputs/tokenizer/`."""

    fingerprint: str
    vocab_size: int
    name_or_path: str
    path: str = "inputs/tokenizer"
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerInfo:
        w = "inputs.json tokenizer"
        return cls(
            fingerprint=_req(d, "fingerprint", str, w),
            vocab_size=_req(d, "vocab_size", int, w),
            name_or_path=_req(d, "name_or_path", str, w),
            path=d.get("path", "inputs/tokenizer"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )


@dataclass(frozen=True)
class InputsMeta:
    """What `prepare` wrote: the samples every teacher run sees (inputs/inputs.json)."""

    kind: Literal["tokens", "arrays"]
    dataset_fingerprint: str
    num_samples: int
    num_positions: int
    max_length: int
    grid: ChunkGrid
    tokenizer: TokenizerInfo | None
    arrays: dict[str, dict[str, Any]]
    label_names: list[str] | None = None
    domains: list[str] | None = None
    has_labels: bool = False
    packed: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    mtkd_version: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["grid"] = self.grid.to_dict()
        d["tokenizer"] = None if self.tokenizer is None else self.tokenizer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputsMeta:
        w = "inputs/inputs.json"
        tok = d.get("tokenizer")
        return cls(
            kind=_choice(_req(d, "kind", str, w), ("tokens", "arrays"), w),  # type: ignore[arg-type]
            dataset_fingerprint=_req(d, "dataset_fingerprint", str, w),
            num_samples=_req(d, "num_samples", int, w),
            num_positions=_req(d, "num_positions", int, w),
            max_length=_req(d, "max_length", int, w),
            grid=ChunkGrid.from_dict(_req(d, "grid", dict, w)),
            tokenizer=None if tok is None else TokenizerInfo.from_dict(tok),
            arrays=_req(d, "arrays", dict, w),
            label_names=d.get("label_names"),
            domains=d.get("domains"),
            has_labels=bool(d.get("has_labels", False)),
            packed=bool(d.get("packed", False)),
            source=d.get("source", {}),
            mtkd_version=d.get("mtkd_version", ""),
            created=d.get("created", ""),
        )


@dataclass(frozen=True)
class ValueEncoding:
    """How top-k log-probabilities are stored.

    `u8log`: code = clip(round(-logp / step), 0, 254) as uint8, decoded as -code * step; code
    255 means probability exactly 0 (log p = -inf).
    `fp16`: logp as IEEE half. `fp32`: logp as float.
    """

    codec: Literal["u8log", "fp16", "fp32"] = "u8log"
    step: float = 1.0 / 16.0

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValueEncoding:
        w = "teacher.json values"
        codec = _choice(_req(d, "codec", str, w), ("u8log", "fp16", "fp32"), w)
        return cls(codec=codec, step=float(d.get("step", 1.0 / 16.0)))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TargetSpec:
    """What soft labels a teacher stores: `topk` (k entries + exact tail) or `sample` (draws)."""

    kind: Literal["topk", "sample"]
    k: int | None = None
    draws: int | None = None
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "topk" and (self.k is None or self.k <= 0):
            raise ValueError(f"--top-k must be a positive integer, got {self.k}")
        if self.kind == "sample" and (self.draws is None or self.draws <= 0):
            raise ValueError(f"--samples must be a positive integer, got {self.draws}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")

    @property
    def width(self) -> int:
        """Entries stored per position: k, or the draw count (unique tokens <= draws)."""
        return int(self.k if self.kind == "topk" else self.draws)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        w = "teacher.json target"
        kind = _choice(_req(d, "kind", str, w), ("topk", "sample"), w)
        return cls(kind=kind, k=d.get("k"), draws=d.get("draws"),  # type: ignore[arg-type]
                   temperature=float(d.get("temperature", 1.0)), seed=int(d.get("seed", 0)))


@dataclass(frozen=True)
class FeatureSpec:
    """One cached intermediate feature: hidden state `layer` (HF index; 0 = embeddings, -1 = last)."""

    layer: int
    pool: Literal["none", "mean"] = "none"
    dtype: Literal["float16", "int8"] = "float16"
    dim: int = 0

    @property
    def name(self) -> str:
        return f"layer_{self.layer}" if self.layer >= 0 else f"layer_m{-self.layer}"

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        w = "teacher.json features"
        return cls(
            layer=_req(d, "layer", int, w),
            pool=_choice(d.get("pool", "none"), ("none", "mean"), w),  # type: ignore[arg-type]
            dtype=_choice(d.get("dtype", "float16"), ("float16", "int8"), w),  # type: ignore[arg-type]
            dim=int(d.get("dim", 0)),
        )


@dataclass(frozen=True)
class TeacherMeta:
    """A teacher group's description (teachers/<name>/teacher.json, written last)."""

    name: str
    model: str
    task: str
    weights_hash: str
    dtype: str
    vocab_size: int
    padded_vocab_size: int
    grid: Literal["token", "sample"]
    target: TargetSpec
    values: ValueEncoding
    index_dtype: str
    tail_dtype: str
    compressor: dict[str, Any]
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None
    features: tuple[FeatureSpec, ...] = ()
    revision: str | None = None
    model_kwargs: dict[str, Any] | None = None
    """Keyword arguments of a `package.module:function` factory (`--model-kwargs`), JSON values."""
    stats: dict[str, Any] = field(default_factory=dict)
    mtkd_version: str = ""
    created: str = ""

    def settings(self) -> dict[str, Any]:
        """The fields that define what is computed; a rerun must match them to resume."""
        d = self.to_dict()
        for volatile in ("stats", "created", "mtkd_version"):
            d.pop(volatile)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["features"] = [f.to_dict() for f in self.features]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherMeta:
        w = f"teacher.json of {d.get('name', '?')!r}"
        return cls(
            name=_req(d, "name", str, w),
            model=_req(d, "model", str, w),
            task=_req(d, "task", str, w),
            weights_hash=_req(d, "weights_hash", str, w),
            dtype=_req(d, "dtype", str, w),
            vocab_size=_req(d, "vocab_size", int, w),
            padded_vocab_size=_req(d, "padded_vocab_size", int, w),
            grid=_choice(_req(d, "grid", str, w), ("token", "sample"), w),  # type: ignore[arg-type]
            target=TargetSpec.from_dict(_req(d, "target", dict, w)),
            values=ValueEncoding.from_dict(_req(d, "values", dict, w)),
            index_dtype=_choice(_req(d, "index_dtype", str, w), ("uint16", "uint32", "int32"), w),
            tail_dtype=_choice(_req(d, "tail_dtype", str, w), ("float16", "float32"), w),
            compressor=_req(d, "compressor", dict, w),
            dataset_fingerprint=_req(d, "dataset_fingerprint", str, w),
            tokenizer_fingerprint=d.get("tokenizer_fingerprint"),
            features=tuple(FeatureSpec.from_dict(f) for f in d.get("features", [])),
            revision=d.get("revision"),
            model_kwargs=d.get("model_kwargs"),
            stats=d.get("stats", {}),
            mtkd_version=d.get("mtkd_version", ""),
            created=d.get("created", ""),
        )


@dataclass(frozen=True)
class Manifest:
    """The cache's root `manifest.json`: written last by every operation, checked first by readers."""

    format_version: int
    mtkd_version: str
    dataset_fingerprint: str
    teachers: tuple[str, ...] = ()
    format: str = FORMAT_NAME
    updated: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["teachers"] = sorted(self.teachers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        w = "manifest.json"
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise CacheFormatError(f"{w}: format is {fmt!r}, expected {FORMAT_NAME!r}; this is not an mtkd cache")
        version = _req(d, "format_version", int, w)
        if version != FORMAT_VERSION:
            raise CacheFormatError(
                f"{w}: format_version {version} is unknown to this mtkd (it reads version "
                f"{FORMAT_VERSION}); install the mtkd version that wrote it "
                f"({d.get('mtkd_version', '?')}) or re-create the cache"
            )
        teachers = _req(d, "teachers", list, w)
        return cls(
            format_version=version,
            mtkd_version=_req(d, "mtkd_version", str, w),
            dataset_fingerprint=_req(d, "dataset_fingerprint", str, w),
            teachers=tuple(str(t) for t in teachers),
            updated=d.get("updated", ""),
        )
