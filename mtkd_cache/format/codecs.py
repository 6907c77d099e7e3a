"""Encodings of stored targets: value codecs, index widths, compressors and checksums.

Top-k log-probabilities are stored as 8-bit codes on a fixed log grid by default
(`code = clip(round(-logp / step), 0, 254)`, decoded as `-code * step`; code 255 is an exact
zero, log p = -inf: a probability that is 0 in float32, log p < -103.97, as a specialist's
never-seen class with a logit of -1e4), or as fp16/fp32. With
step 1/16 the largest per-entry error in log space is 1/32 nat, and the KL it adds to a
renormalised top-k distribution is about step**2 / 24 ≈ 1.6e-4 nats (measured in
benchmarks/). Indices use 16 bits when the vocabulary fits (<= 65,536 entries) and 32 bits
otherwise. Rows of indices are sorted ascending, which makes them compress well.

Each value codec is one `ValueCodec` in `VALUE_CODECS` (name -> storage dtype, encode, decode):
a new codec is one entry here plus its test. Every inner zarr chunk of a v2 cache ends with a
crc32c of its compressed bytes (`chunk_codecs`), so a flipped byte fails the read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from mtkd_cache.errors import CacheFormatError

__all__ = [
    "COMPRESSORS",
    "VALUE_CODECS",
    "Compressor",
    "ValueCodec",
    "ValueEncoding",
    "array_checksum",
    "chunk_codecs",
    "compressor_from_dict",
    "decode_values",
    "encode_values",
    "index_dtype_for",
    "quantize_rows_int8",
    "value_dtype",
]

_U8_MAX = 255


@dataclass(frozen=True)
class ValueCodec:
    """How one value codec stores float32 log-probabilities: its dtype and the two directions."""

    dtype: str
    encode: Callable[[np.ndarray, float], np.ndarray]
    decode: Callable[[np.ndarray, float], np.ndarray]
    #: True when any stored value is valid (u8 codes); else values must be <= 0 or -inf, never NaN.
    any_code_valid: bool = False


_F32_ZERO_LOGP = float(np.log(float(np.finfo(np.float32).smallest_subnormal) / 2))
"""log p below this (-103.97) is a probability that rounds to exactly 0 in float32, as the tail counts it."""


def _u8_encode(logp: np.ndarray, step: float) -> np.ndarray:
    x = np.asarray(logp, dtype=np.float32)
    codes = np.clip(np.rint(-np.nan_to_num(x, neginf=0.0) / step), 0, _U8_MAX - 1)
    return np.where(x < _F32_ZERO_LOGP, _U8_MAX, codes).astype(np.uint8)  # 255 = probability exactly 0


def _u8_decode(stored: np.ndarray, step: float) -> np.ndarray:
    out = stored.astype(np.float32)
    out *= np.float32(-step)  # in place: one float32 pass, no second temporary
    out[stored == _U8_MAX] = -np.inf
    return out


def _float_codec(dtype: str) -> ValueCodec:
    return ValueCodec(dtype, lambda x, _s: np.asarray(x, dtype=dtype), lambda x, _s: x.astype(np.float32))


VALUE_CODECS: dict[str, ValueCodec] = {
    "u8log": ValueCodec("uint8", _u8_encode, _u8_decode, any_code_valid=True),
    "fp16": _float_codec("float16"),
    "fp32": _float_codec("float32"),
}


@dataclass(frozen=True)
class ValueEncoding:
    """How top-k log-probabilities are stored (`codec` names an entry of `VALUE_CODECS`).

    `u8log`: code = clip(round(-logp / step), 0, 254) as uint8, decoded as -code * step; code
    255 means probability exactly 0 (log p = -inf), stored for every log p whose probability is
    0 in float32 (log p < -103.97).
    `fp16`: logp as IEEE half. `fp32`: logp as float.
    """

    codec: Literal["u8log", "fp16", "fp32"] = "u8log"
    step: float = 1.0 / 16.0

    def __post_init__(self) -> None:
        if self.codec not in VALUE_CODECS:
            raise CacheFormatError(f"values.codec {self.codec!r} is not one of {tuple(VALUE_CODECS)}")
        if isinstance(self.step, bool) or not isinstance(self.step, int | float) or not 0 < self.step < 1e3:
            raise CacheFormatError(f"values.step must be a positive number, got {self.step!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValueEncoding:
        return cls(codec=d.get("codec"), step=d.get("step", 1.0 / 16.0))  # type: ignore[arg-type]


def index_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned index type for `vocab_size` entries (16-bit up to 65,536)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def value_dtype(enc: ValueEncoding) -> str:
    return VALUE_CODECS[enc.codec].dtype


def encode_values(logp: np.ndarray, enc: ValueEncoding) -> np.ndarray:
    """Encode log-probabilities (any shape, <= 0) for storage."""
    return VALUE_CODECS[enc.codec].encode(logp, enc.step)


def decode_values(stored: np.ndarray, enc: ValueEncoding) -> np.ndarray:
    """Decode stored values back to float32 log-probabilities."""
    return VALUE_CODECS[enc.codec].decode(stored, enc.step)


COMPRESSORS = ("zstd", "blosc")


@dataclass(frozen=True)
class Compressor:
    """The bytes-to-bytes compressor of every array: zstd or blosc(zstd, shuffle) at `level`."""

    name: Literal["zstd", "blosc"] = "zstd"
    level: int = 3
    shuffle: str = "shuffle"

    def __post_init__(self) -> None:
        if self.name not in COMPRESSORS:
            raise CacheFormatError(f"compressor {self.name!r} is not supported; use one of {COMPRESSORS}")
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not -7 <= self.level <= 22:
            raise CacheFormatError(f"compressor level must be an integer in [-7, 22], got {self.level!r}")

    def codec(self) -> Any:
        """The zarr v3 bytes-to-bytes codec."""
        if self.name == "zstd":
            return ZstdCodec(level=self.level)
        return BloscCodec(cname="zstd", clevel=self.level, shuffle=self.shuffle)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "level": self.level}
        if self.name == "blosc":
            d["shuffle"] = self.shuffle
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Compressor:
        return cls(name=d.get("name", "zstd"), level=d.get("level", 3),  # type: ignore[arg-type]
                   shuffle=d.get("shuffle", "shuffle"))


def compressor_from_dict(d: dict[str, Any]) -> Any:
    """Build the zarr v3 bytes-to-bytes codec recorded in metadata: zstd or blosc(zstd, shuffle)."""
    return Compressor.from_dict(d).codec()


def chunk_codecs(compressor: Compressor) -> list[Any]:
    """Bytes-to-bytes codecs of every inner chunk: compress, then a crc32c of the compressed bytes."""
    return [compressor.codec(), Crc32cCodec()]


def array_checksum(block: np.ndarray) -> str:
    """Content checksum of a decoded block: blake2b-128 over dtype, shape and C-order bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{block.dtype.str}{block.shape}".encode())
    h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 codes: x ≈ q * scale[:, None], scale = max|x| / 127 per row."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)
