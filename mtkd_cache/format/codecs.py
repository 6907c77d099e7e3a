"""Encodings of stored targets: value codes, index widths, compressors and checksums.

Top-k log-probabilities are stored as 8-bit codes on a fixed log grid by default
(`code = clip(round(-logp / step), 0, 254)`, decoded as `-code * step`; code 255 is an exact
zero, log p = -inf), or as fp16/fp32. With
step 1/16 the largest per-entry error in log space is 1/32 nat, and the KL it adds to a
renormalised top-k distribution is about step**2 / 24 ≈ 1.6e-4 nats (measured in
benchmarks/). Indices use 16 bits when the vocabulary fits (<= 65,536 entries) and 32 bits
otherwise. Rows of indices are sorted ascending, which makes them compress well.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from mtkd_cache.format.meta import ValueEncoding

__all__ = [
    "array_checksum",
    "compressor_from_dict",
    "decode_values",
    "encode_values",
    "index_dtype_for",
    "quantize_rows_int8",
    "value_dtype",
]

_U8_MAX = 255


def index_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned index type for `vocab_size` entries (16-bit up to 65,536)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def value_dtype(enc: ValueEncoding) -> str:
    return {"u8log": "uint8", "fp16": "float16", "fp32": "float32"}[enc.codec]


def encode_values(logp: np.ndarray, enc: ValueEncoding) -> np.ndarray:
    """Encode log-probabilities (any shape, <= 0) for storage."""
    if enc.codec == "u8log":
        x = np.asarray(logp, dtype=np.float32)
        codes = np.clip(np.rint(-np.nan_to_num(x, neginf=0.0) / enc.step), 0, _U8_MAX - 1)
        return np.where(np.isneginf(x), _U8_MAX, codes).astype(np.uint8)  # 255 = probability exactly 0
    return np.asarray(logp, dtype=value_dtype(enc))


def decode_values(stored: np.ndarray, enc: ValueEncoding) -> np.ndarray:
    """Decode stored values back to float32 log-probabilities."""
    if enc.codec == "u8log":
        out = stored.astype(np.float32) * np.float32(-enc.step)
        out[stored == _U8_MAX] = -np.inf
        return out
    return stored.astype(np.float32)


def compressor_from_dict(d: dict[str, Any]) -> Any:
    """Build the zarr v3 bytes-to-bytes codec recorded in metadata: zstd or blosc(zstd, shuffle)."""
    name = d.get("name", "zstd")
    level = int(d.get("level", 3))
    if name == "zstd":
        return ZstdCodec(level=level)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=level, shuffle=d.get("shuffle", "shuffle"))
    raise ValueError(f"compressor {name!r} is not supported; use 'zstd' or 'blosc'")


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
