"""Target kinds and feature encodings: the one registry of what each stores and how.

A target kind (`topk`, `sample`) or a feature encoding (`float16`, `int8`) is one object here:
its arrays (`ArrayDef`: name, per-row shape, dtype), `encode` (rows given to the writer ->
stored arrays), `decode` (stored arrays -> what readers return) and `check` (the read-time
sanity test: token ids in [0, vocab) and ascending, log-probabilities <= 0, tail in [0, 1],
draw counts summing to `draws`). The writer, the reader, verify and migrate all iterate
`teacher_arrays(meta)`, so a new kind or encoding touches this module plus its test.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from mtkd_cache.format.codecs import (
    VALUE_CODECS,
    decode_values,
    encode_values,
    quantize_rows_int8,
    value_dtype,
)
from mtkd_cache.format.layout import GridName, feature_grid

if TYPE_CHECKING:
    from mtkd_cache.format.meta import FeatureSpec, TeacherMeta

__all__ = [
    "FEATURE_ENCODINGS",
    "NoTargetsBlock",
    "TARGET_KINDS",
    "ArrayDef",
    "SampledBlock",
    "StoredArray",
    "TopkBlock",
    "teacher_arrays",
]

Raw = Mapping[str, np.ndarray]


class TopkBlock(NamedTuple):
    """Top-k targets for R rows: indices (R, K) int64, logp (R, K) float32, tail (R,) float32."""

    indices: np.ndarray
    logp: np.ndarray
    tail: np.ndarray


class SampledBlock(NamedTuple):
    """Sampled targets for R rows: indices (R, n) int64 and counts (R, n) int32 (0 = padding)."""

    indices: np.ndarray
    counts: np.ndarray


class NoTargetsBlock(NamedTuple):
    """The targets of a feature-only teacher (kind `none`): nothing; its features are read apart."""


class ArrayDef(NamedTuple):
    """One stored array: `name` relative to its owner, shape of one row, storage dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str


class StoredArray(NamedTuple):
    """One array of a teacher group: key relative to the group, row shape, dtype and grid."""

    key: str
    row_shape: tuple[int, ...]
    dtype: str
    grid: GridName


class TargetKind(Protocol):
    def arrays(self, meta: TeacherMeta) -> list[ArrayDef]: ...
    def encode(self, meta: TeacherMeta, rows: Raw) -> dict[str, np.ndarray]: ...
    def decode(self, meta: TeacherMeta, raw: Raw) -> TopkBlock | SampledBlock | NoTargetsBlock: ...
    def check(self, meta: TeacherMeta, raw: Raw) -> tuple[str, str] | None: ...


class FeatureEncoding(Protocol):
    def arrays(self, spec: FeatureSpec) -> list[ArrayDef]: ...
    def encode(self, spec: FeatureSpec, x: np.ndarray) -> dict[str, np.ndarray]: ...
    def decode(self, spec: FeatureSpec, raw: Raw) -> np.ndarray: ...
    def check(self, spec: FeatureSpec, raw: Raw) -> tuple[str, str] | None: ...


def _check_indices(a: np.ndarray, vocab: int, strict: bool) -> str | None:
    """Why index rows `a` (R, W) are invalid: an id outside [0, vocab) or rows not ascending."""
    if a.size == 0:
        return None
    top = int(a.max())
    if top >= vocab or (a.dtype.kind == "i" and int(a.min()) < 0):
        return f"token id {top if top >= vocab else int(a.min())} is outside the vocabulary [0, {vocab})"
    if a.shape[-1] > 1:
        later, earlier = a[..., 1:], a[..., :-1]
        if not (later > earlier if strict else later >= earlier).all():
            return f"token ids are not {'strictly ' if strict else ''}ascending within a row"
    return None


class Topk:
    """`topk`: k ascending token ids, their log-probabilities (a value codec) and the tail mass."""

    def arrays(self, meta: TeacherMeta) -> list[ArrayDef]:
        w = meta.target.width
        return [ArrayDef("indices", (w,), meta.index_dtype), ArrayDef("values", (w,), value_dtype(meta.values)),
                ArrayDef("tail", (), meta.tail_dtype)]

    def encode(self, meta: TeacherMeta, rows: Raw) -> dict[str, np.ndarray]:
        return {"indices": np.asarray(rows["indices"]).astype(meta.index_dtype),
                "values": encode_values(rows["logp"], meta.values),
                "tail": np.asarray(rows["tail"], dtype=meta.tail_dtype)}

    def decode(self, meta: TeacherMeta, raw: Raw) -> TopkBlock:
        return TopkBlock(raw["indices"].astype(np.int64), decode_values(raw["values"], meta.values),
                         raw["tail"].astype(np.float32))

    def check(self, meta: TeacherMeta, raw: Raw) -> tuple[str, str] | None:
        bad = _check_indices(raw["indices"], meta.vocab_size, strict=True)
        if bad:
            return "indices", bad
        if not VALUE_CODECS[meta.values.codec].any_code_valid and not (raw["values"] <= 0).all():
            return "values", "a log-probability is above 0 or NaN"
        tail = raw["tail"]
        if not ((tail >= 0) & (tail <= 1)).all():
            return "tail", "a tail mass is outside [0, 1] or NaN"
        return None


class Sampled:
    """`sample`: distinct drawn token ids (ascending, padding repeats the last) and their counts."""

    def arrays(self, meta: TeacherMeta) -> list[ArrayDef]:
        w = meta.target.width
        return [ArrayDef("indices", (w,), meta.index_dtype), ArrayDef("counts", (w,), "uint16")]

    def encode(self, meta: TeacherMeta, rows: Raw) -> dict[str, np.ndarray]:
        return {"indices": np.asarray(rows["indices"]).astype(meta.index_dtype),
                "counts": np.asarray(rows["counts"]).astype(np.uint16)}

    def decode(self, meta: TeacherMeta, raw: Raw) -> SampledBlock:
        return SampledBlock(raw["indices"].astype(np.int64), raw["counts"].astype(np.int32))

    def check(self, meta: TeacherMeta, raw: Raw) -> tuple[str, str] | None:
        bad = _check_indices(raw["indices"], meta.vocab_size, strict=False)
        if bad:
            return "indices", bad
        counts = raw["counts"]
        if counts.size and not (counts.sum(axis=-1, dtype=np.int64) == meta.target.draws).all():
            return "counts", f"draw counts of a row do not sum to {meta.target.draws}"
        return None


class NoTargets:
    """`none`: a teacher without an output head (an encoder) stores no targets, only its features."""

    def arrays(self, meta: TeacherMeta) -> list[ArrayDef]:
        return []

    def encode(self, meta: TeacherMeta, rows: Raw) -> dict[str, np.ndarray]:
        return {}

    def decode(self, meta: TeacherMeta, raw: Raw) -> NoTargetsBlock:
        return NoTargetsBlock()

    def check(self, meta: TeacherMeta, raw: Raw) -> tuple[str, str] | None:
        return None


class Float16Feature:
    """`float16`: the hidden state itself."""

    def arrays(self, spec: FeatureSpec) -> list[ArrayDef]:
        return [ArrayDef(spec.name, (spec.dim,), "float16")]

    def encode(self, spec: FeatureSpec, x: np.ndarray) -> dict[str, np.ndarray]:
        return {spec.name: np.asarray(x, dtype=np.float16)}

    def decode(self, spec: FeatureSpec, raw: Raw) -> np.ndarray:
        return raw[spec.name].astype(np.float32)

    def check(self, spec: FeatureSpec, raw: Raw) -> tuple[str, str] | None:
        return None  # any float16 is a valid hidden state; the crc32c guards the bytes


class Int8Feature:
    """`int8`: symmetric per-row codes and a float32 scale per row (x ≈ code × scale)."""

    def arrays(self, spec: FeatureSpec) -> list[ArrayDef]:
        return [ArrayDef(spec.name, (spec.dim,), "int8"), ArrayDef(f"{spec.name}_scale", (), "float32")]

    def encode(self, spec: FeatureSpec, x: np.ndarray) -> dict[str, np.ndarray]:
        q, scale = quantize_rows_int8(x)
        return {spec.name: q, f"{spec.name}_scale": scale}

    def decode(self, spec: FeatureSpec, raw: Raw) -> np.ndarray:
        return raw[spec.name].astype(np.float32) * raw[f"{spec.name}_scale"].astype(np.float32)[:, None]

    def check(self, spec: FeatureSpec, raw: Raw) -> tuple[str, str] | None:
        scale = raw[f"{spec.name}_scale"]
        if not (np.isfinite(scale) & (scale >= 0)).all():
            return f"{spec.name}_scale", "a feature scale is negative or not finite"
        return None


TARGET_KINDS: dict[str, TargetKind] = {"topk": Topk(), "sample": Sampled(), "none": NoTargets()}
FEATURE_ENCODINGS: dict[str, FeatureEncoding] = {"float16": Float16Feature(), "int8": Int8Feature()}


def feature_arrays(meta: TeacherMeta, spec: FeatureSpec) -> list[StoredArray]:
    """The arrays of one feature, keyed `features/<name>...`, on the feature's grid."""
    grid = feature_grid(meta.grid, spec.pool)
    return [StoredArray(f"features/{a.name}", a.row_shape, a.dtype, grid)
            for a in FEATURE_ENCODINGS[spec.dtype].arrays(spec)]


def teacher_arrays(meta: TeacherMeta) -> list[StoredArray]:
    """Every array of a teacher group, in creation order."""
    out = [StoredArray(a.name, a.row_shape, a.dtype, meta.grid) for a in TARGET_KINDS[meta.target.kind].arrays(meta)]
    for spec in meta.features:
        out += feature_arrays(meta, spec)
    return out
