"""Metadata of a cache: frozen dataclasses that round-trip through JSON.

Every dataclass validates itself at construction (`__post_init__` runs the `parse_*` checks, as
zarr-python's metadata classes do), so metadata built in code is as checked as metadata read
from disk. `from_dict` additionally names the file a bad field came from. docs/FORMAT.md is the
contract; a reader never guesses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mtkd_cache._version import FORMAT_NAME, FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from mtkd_cache.errors import CacheFormatError
from mtkd_cache.format._parse import parse_choice, parse_int, parse_positive, req
from mtkd_cache.format.codecs import Compressor, ValueEncoding
from mtkd_cache.format.layout import ChunkGrid

__all__ = [
    "ChunkGrid",
    "Compressor",
    "FeatureSpec",
    "InputsMeta",
    "Manifest",
    "TargetSpec",
    "TeacherMeta",
    "TeacherStats",
    "TokenizerInfo",
    "ValueEncoding",
    "content_hash",
]

#: Key in a teacher's chunks.parquet schema metadata: the sha256 (`content_hash`) of the
#: teacher.json written with it, so an edited teacher.json is detected.
TEACHER_HASH_KEY = "mtkd:teacher_json_sha256"

TARGET_KINDS = ("topk", "sample", "none")
#: Feature pooling modes (sentence-transformers' order); a pooled feature's `pool` is "+"-joined
#: modes, optionally ending in "+normalize" (L2), e.g. "mean+normalize" (see precompute/pooling.py).
POOL_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
FEATURE_DTYPES = ("float16", "int8")
INDEX_DTYPES = ("uint16", "uint32", "int32")
TAIL_DTYPES = ("float16", "float32")


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def content_hash(d: Mapping[str, Any]) -> str:
    """sha256 of a JSON object's canonical form (sorted keys, no whitespace): what verify checked."""
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_teacher_name(name: Any) -> str:
    """A teacher name is one plain folder name: no path separators, no leading '.' or '_'."""
    if not isinstance(name, str) or not name or any(c in name for c in '/\\:') or name.startswith((".", "_")) \
            or not name.isprintable() or name != name.strip():
        raise CacheFormatError(f"teacher name {name!r} is not a plain folder name: use letters, digits, '-', "
                               f"'.' or '_' (not first), without '/', '\\' or ':', e.g. 'qwen7b'")
    return name


def parse_pool(value: Any) -> str:
    """A feature pooling: "none", or "+"-joined `POOL_MODES` with an optional trailing "+normalize"."""
    parts = value.split("+") if isinstance(value, str) else []
    modes = parts[:-1] if parts[-1:] == ["normalize"] else parts
    if value != "none" and (not modes or any(m not in POOL_MODES for m in modes) or len(set(modes)) < len(modes)):
        raise CacheFormatError(f"feature pool {value!r} must be 'none' or modes from {list(POOL_MODES)} joined by "
                               f"'+', optionally ending in '+normalize' (e.g. 'mean+normalize')")
    return str(value)


def _from(cls: Any, d: dict[str, Any], where: str) -> Any:
    """`cls.from_dict(d)` with the file named in any error."""
    try:
        return cls.from_dict(d)
    except CacheFormatError as e:
        raise CacheFormatError(f"{where}: {e}") from None


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the inputs were made with; its files are copied into `inputs/tokenizer/`."""

    fingerprint: str
    vocab_size: int
    name_or_path: str
    path: str = "inputs/tokenizer"
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        parse_positive(self.vocab_size, "tokenizer vocab_size")

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerInfo:
        w = "inputs.json tokenizer"
        return cls(
            fingerprint=req(d, "fingerprint", str, w),
            vocab_size=req(d, "vocab_size", int, w),
            name_or_path=req(d, "name_or_path", str, w),
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
    text: dict[str, Any] | None = None
    """The stored source text (format 3, token inputs not packed): `{"fingerprint", "num_bytes"}`."""

    def __post_init__(self) -> None:
        parse_choice(self.kind, ("tokens", "arrays"), "inputs kind")
        for name in ("num_samples", "num_positions", "max_length"):
            parse_int(getattr(self, name), f"inputs {name}")
        if self.grid.num_samples != self.num_samples:
            raise CacheFormatError(f"inputs: grid holds {self.grid.num_samples} samples, num_samples is {self.num_samples}")

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["grid"] = self.grid.to_dict()
        d["tokenizer"] = None if self.tokenizer is None else self.tokenizer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputsMeta:
        w = "inputs/inputs.json"
        try:
            return cls._from_dict(d, w)
        except CacheFormatError as e:
            raise CacheFormatError(str(e) if str(e).startswith(w) else f"{w}: {e}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any], w: str) -> InputsMeta:
        tok = d.get("tokenizer")
        return cls(
            kind=req(d, "kind", str, w),
            dataset_fingerprint=req(d, "dataset_fingerprint", str, w),
            num_samples=req(d, "num_samples", int, w),
            num_positions=req(d, "num_positions", int, w),
            max_length=req(d, "max_length", int, w),
            grid=ChunkGrid.from_dict(req(d, "grid", dict, w)),
            tokenizer=None if tok is None else TokenizerInfo.from_dict(tok),
            arrays=req(d, "arrays", dict, w),
            label_names=d.get("label_names"),
            domains=d.get("domains"),
            has_labels=bool(d.get("has_labels", False)),
            packed=bool(d.get("packed", False)),
            source=d.get("source", {}),
            mtkd_version=d.get("mtkd_version", ""),
            created=d.get("created", ""),
            text=d.get("text"),
        )


@dataclass(frozen=True)
class TargetSpec:
    """What soft labels a teacher stores: `topk` (k entries + exact tail), `sample` (draws), or
    `none` (a teacher without an output head, e.g. a sentence encoder: features only)."""

    kind: Literal["topk", "sample", "none"]
    k: int | None = None
    draws: int | None = None
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        parse_choice(self.kind, TARGET_KINDS, "target kind")
        if self.kind == "topk":
            parse_positive(self.k, "target k (top-k entries)")
        elif self.kind == "none":
            if self.k is not None or self.draws is not None:
                raise CacheFormatError(f"target kind 'none' stores no targets, got k={self.k!r}, draws={self.draws!r}")
        else:
            parse_positive(self.draws, "target draws (samples per position)")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) \
                or not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise CacheFormatError(f"target temperature must be a finite number > 0, got {self.temperature!r}")
        parse_int(self.seed, "target seed")

    @property
    def width(self) -> int:
        """Entries stored per position: k, or the draw count (unique tokens <= draws); 0 for `none`."""
        if self.kind == "none":
            return 0
        return int(self.k if self.kind == "topk" else self.draws)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        return cls(kind=d.get("kind"), k=d.get("k"), draws=d.get("draws"),  # type: ignore[arg-type]
                   temperature=d.get("temperature", 1.0), seed=d.get("seed", 0))


@dataclass(frozen=True)
class FeatureSpec:
    """One cached intermediate feature: hidden state `layer` (HF index; 0 = embeddings, -1 = last)."""

    layer: int
    pool: str = "none"
    """`none` (per position), or pooled per sample: "+"-joined `POOL_MODES`, optionally "+normalize"."""
    dtype: Literal["float16", "int8"] = "float16"
    dim: int = 0

    def __post_init__(self) -> None:
        parse_int(self.layer, "feature layer")
        parse_pool(self.pool)
        parse_choice(self.dtype, FEATURE_DTYPES, "feature dtype")
        parse_int(self.dim, "feature dim")

    @property
    def name(self) -> str:
        return f"layer_{self.layer}" if self.layer >= 0 else f"layer_m{-self.layer}"

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(layer=req(d, "layer", int, "feature"), pool=d.get("pool", "none"),
                   dtype=d.get("dtype", "float16"), dim=d.get("dim", 0))


@dataclass(frozen=True)
class TeacherStats(Mapping[str, Any]):
    """Statistics over every position, summed from the commit markers by `finish`.

    Also a read-only mapping of its set fields (`stats["positions"]`, `stats.get("mean_tail")`).
    """

    positions: int = 0
    mean_tail: float | None = None
    mean_entropy: float | None = None
    mean_top1_prob: float | None = None
    bytes: int = 0
    bytes_per_position: float = 0.0

    def __post_init__(self) -> None:
        parse_int(self.positions, "stats positions")
        parse_int(self.bytes, "stats bytes")

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._names() if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @staticmethod
    def _names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TeacherStats))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherStats:
        return cls(**{k: d[k] for k in cls._names() if k in d})


@dataclass(frozen=True)
class TeacherMeta:
    """A teacher group's description (teachers/<name>/teacher.json, written last).

    `compressor` and `stats` may be given as dicts; they are converted to `Compressor` and
    `TeacherStats` at construction.
    """

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
    compressor: Compressor
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None
    features: tuple[FeatureSpec, ...] = ()
    revision: str | None = None
    model_kwargs: dict[str, Any] | None = None
    """Keyword arguments of a `package.module:function` factory (`--model-kwargs`), JSON values."""
    stats: TeacherStats = field(default_factory=TeacherStats)
    mtkd_version: str = ""
    created: str = ""
    tokenization: str | None = None
    """The tokenization of the stored text the teacher ran on (`tokenizations/<id>`); None = the inputs'."""
    documents: str | None = None
    """"isolated" when the inputs are packed and each document saw only itself (format/packing.py);
    None otherwise. A causal-LM teacher on packed inputs without it saw the other documents of its
    sample (cached before isolation existed) and is refused by the reader."""

    def __post_init__(self) -> None:
        if isinstance(self.compressor, Mapping):
            object.__setattr__(self, "compressor", Compressor.from_dict(dict(self.compressor)))
        if isinstance(self.stats, Mapping) and not isinstance(self.stats, TeacherStats):
            object.__setattr__(self, "stats", TeacherStats.from_dict(self.stats))
        object.__setattr__(self, "features", tuple(self.features))
        parse_teacher_name(self.name)
        parse_positive(self.vocab_size, "teacher vocab_size")
        parse_positive(self.padded_vocab_size, "teacher padded_vocab_size")
        parse_choice(self.grid, ("token", "sample"), "teacher grid")
        parse_choice(self.index_dtype, INDEX_DTYPES, "teacher index_dtype")
        parse_choice(self.tail_dtype, TAIL_DTYPES, "teacher tail_dtype")
        for name, cls in (("target", TargetSpec), ("values", ValueEncoding), ("compressor", Compressor)):
            if not isinstance(getattr(self, name), cls):
                raise CacheFormatError(f"teacher {name} must be a {cls.__name__}, got {getattr(self, name)!r}")

    def settings(self) -> dict[str, Any]:
        """The fields that define what is computed; a rerun must match them to resume.

        ``model_kwargs`` is left out when there are none, so teachers cached before the field
        existed (or migrated from v1) keep their settings hash.
        """
        d = self.to_dict()
        for volatile in ("stats", "created", "mtkd_version"):
            d.pop(volatile)
        for optional in ("model_kwargs", "tokenization", "documents"):
            if d.get(optional) is None:
                d.pop(optional, None)
        return d

    def settings_hash(self) -> str:
        """`content_hash` of `settings()`; every commit marker records it."""
        return content_hash(self.settings())

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["features"] = [f.to_dict() for f in self.features]
        d["compressor"] = self.compressor.to_dict()
        d["stats"] = self.stats.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherMeta:
        w = f"teacher.json of {d.get('name', '?')!r}"
        try:
            return cls(
                name=req(d, "name", str, w), model=req(d, "model", str, w), task=req(d, "task", str, w),
                weights_hash=req(d, "weights_hash", str, w), dtype=req(d, "dtype", str, w),
                vocab_size=req(d, "vocab_size", int, w), padded_vocab_size=req(d, "padded_vocab_size", int, w),
                grid=req(d, "grid", str, w),  # type: ignore[arg-type]
                target=_from(TargetSpec, req(d, "target", dict, w), w),
                values=_from(ValueEncoding, req(d, "values", dict, w), w),
                index_dtype=req(d, "index_dtype", str, w), tail_dtype=req(d, "tail_dtype", str, w),
                compressor=_from(Compressor, req(d, "compressor", dict, w), w),
                dataset_fingerprint=req(d, "dataset_fingerprint", str, w),
                tokenizer_fingerprint=d.get("tokenizer_fingerprint"),
                features=tuple(_from(FeatureSpec, f, w) for f in req(d, "features", list, w)) if "features" in d else (),
                revision=d.get("revision"), model_kwargs=d.get("model_kwargs"),
                stats=_from(TeacherStats, d.get("stats", {}), w),
                mtkd_version=d.get("mtkd_version", ""), created=d.get("created", ""),
                tokenization=d.get("tokenization"), documents=d.get("documents"),
            )
        except CacheFormatError as e:
            raise CacheFormatError(str(e) if str(e).startswith(w) else f"{w}: {e}") from None


def migrate_hint(url: str = "CACHE") -> str:
    return f"run `mtkd-cache migrate {url}` to upgrade it in place (targets are not recomputed)"


@dataclass(frozen=True)
class Manifest:
    """The cache's root `manifest.json`: written last by `prepare`, checked first by readers.

    Format version 2 has no teacher list: a teacher is complete exactly when its own
    `teachers/<name>/teacher.json` exists (see docs/FORMAT.md), so concurrent writers never
    read-modify-write a shared file.
    """

    format_version: int
    mtkd_version: str
    dataset_fingerprint: str
    format: str = FORMAT_NAME
    updated: str = ""

    def __post_init__(self) -> None:
        if self.format != FORMAT_NAME:
            raise CacheFormatError(f"format is {self.format!r}, expected {FORMAT_NAME!r}; this is not an mtkd cache")
        if parse_int(self.format_version, "format_version") not in READABLE_FORMAT_VERSIONS:
            raise CacheFormatError(f"format_version {self.format_version} is unknown to this mtkd (it reads "
                                   f"versions {list(READABLE_FORMAT_VERSIONS)})")

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], url: str = "CACHE") -> Manifest:
        w = "manifest.json"
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise CacheFormatError(f"{w}: format is {fmt!r}, expected {FORMAT_NAME!r}; this is not an mtkd cache")
        version = req(d, "format_version", int, w)
        if version < min(READABLE_FORMAT_VERSIONS):
            raise CacheFormatError(
                f"{w}: {url} is an mtkd cache of format_version {version}; this mtkd reads version "
                f"{FORMAT_VERSION} only: {migrate_hint(url)}")
        if version not in READABLE_FORMAT_VERSIONS:
            raise CacheFormatError(
                f"{w}: format_version {version} is unknown to this mtkd (it reads version "
                f"{FORMAT_VERSION}); install the mtkd version that wrote it "
                f"({d.get('mtkd_version', '?')}) or re-create the cache"
            )
        return cls(
            format_version=version,
            mtkd_version=req(d, "mtkd_version", str, w),
            dataset_fingerprint=req(d, "dataset_fingerprint", str, w),
            updated=d.get("updated", ""),
        )
