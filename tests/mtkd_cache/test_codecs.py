"""Unit tests of `mtkd_cache.format.codecs`: value codes, index widths, compressors, checksums and
int8 feature codes, each pinned to what docs/FORMAT.md and the docstrings state.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from zarr.codecs import BloscCodec, ZstdCodec

from mtkd_cache import ValueEncoding
from mtkd_cache.errors import CacheFormatError
from mtkd_cache.format.codecs import (
    array_checksum,
    compressor_from_dict,
    decode_values,
    encode_values,
    index_dtype_for,
    quantize_rows_int8,
    value_dtype,
)


def test_u8log_codes_round_to_the_nearest_step_and_clip() -> None:
    enc = ValueEncoding("u8log", 0.5)
    logp = np.array([[0.0, -0.24, -0.26, -1.0], [-100.1, -103.9, -104.0, -np.inf]])
    codes = encode_values(logp, enc)
    assert codes.dtype == np.uint8 and codes.shape == (2, 4)
    # a probability that is 0 in float32 (log p < -103.97) is the exact zero, even where the grid reaches
    np.testing.assert_array_equal(codes, [[0, 0, 1, 2], [200, 208, 255, 255]])
    back = decode_values(codes, enc)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, np.array([[0, 0, -0.5, -1.0], [-100, -104, -np.inf, -np.inf]], np.float32))
    clipped = encode_values(np.array([-60.0, -103.9]), ValueEncoding("u8log", 0.25))
    np.testing.assert_array_equal(clipped, [240, 254])  # below the grid's last finite code: clipped to it


def test_u8log_maps_only_float32_zero_probabilities_to_code_255() -> None:
    enc = ValueEncoding("u8log", 1 / 16)
    codes = encode_values(np.array([-np.inf, -1e30, -103.5, -20.0, 0.0], dtype=np.float32), enc)
    np.testing.assert_array_equal(codes, [255, 255, 254, 254, 0])  # exp(-103.5) > 0 in float32: clipped
    assert np.isneginf(decode_values(np.array([255], np.uint8), enc)).all()
    assert decode_values(np.array([254], np.uint8), enc)[0] == np.float32(-254 / 16)


@pytest.mark.parametrize(("codec", "dtype"), [("fp16", np.float16), ("fp32", np.float32)])
def test_float_codecs_store_the_log_probability_itself(codec: str, dtype: type) -> None:
    enc = ValueEncoding(codec, 1 / 16)  # type: ignore[arg-type]
    logp = np.array([0.0, -0.1234567, -12.5, -np.inf], dtype=np.float64)
    stored = encode_values(logp, enc)
    assert stored.dtype == dtype and value_dtype(enc) == np.dtype(dtype).name
    back = decode_values(stored, enc)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, logp.astype(dtype).astype(np.float32))


def test_value_dtype_of_u8log() -> None:
    assert value_dtype(ValueEncoding("u8log", 1 / 16)) == "uint8"


def test_index_width_boundaries_and_bad_vocabulary() -> None:
    assert index_dtype_for(1) == "uint16"
    assert index_dtype_for(1 << 16) == "uint16"
    assert index_dtype_for((1 << 16) + 1) == "uint32"
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"vocab_size must be positive, got {bad}"):
            index_dtype_for(bad)


def test_compressors_from_metadata() -> None:
    default = compressor_from_dict({})
    assert isinstance(default, ZstdCodec) and default.level == 3
    z = compressor_from_dict({"name": "zstd", "level": 7})
    assert isinstance(z, ZstdCodec) and z.level == 7
    with pytest.raises(CacheFormatError, match="level must be an integer"):  # metadata is typed, not coerced
        compressor_from_dict({"name": "zstd", "level": "7"})
    b = compressor_from_dict({"name": "blosc", "level": 5})
    assert isinstance(b, BloscCodec) and b.clevel == 5 and b.cname.value == "zstd"
    assert b.shuffle.value == "shuffle"
    bit = compressor_from_dict({"name": "blosc", "shuffle": "bitshuffle"})
    assert bit.shuffle.value == "bitshuffle" and bit.clevel == 3
    with pytest.raises(ValueError, match=r"compressor 'lz4' is not supported; use one of \('zstd', 'blosc'\)"):
        compressor_from_dict({"name": "lz4"})


def test_array_checksum_is_the_documented_blake2b() -> None:
    block = np.arange(12, dtype=np.int32).reshape(3, 4)
    want = hashlib.blake2b(digest_size=16)
    want.update(b"<i4(3, 4)" + block.tobytes())
    assert array_checksum(block) == want.hexdigest()
    assert array_checksum(block.reshape(4, 3)) != array_checksum(block)
    assert array_checksum(block.view(np.float32)) != array_checksum(block)
    strided = np.arange(24, dtype=np.int32).reshape(3, 8)[:, ::2]  # not C-contiguous
    assert array_checksum(strided) == array_checksum(np.ascontiguousarray(strided))


def test_int8_rows_scale_by_the_row_maximum() -> None:
    x = np.array([[127.0, -63.5, 0.2], [0.0, 0.0, 0.0], [-2.54, 1.27, 0.0]], dtype=np.float64)
    q, scale = quantize_rows_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3,)
    np.testing.assert_allclose(scale, [1.0, 0.0, 0.02], rtol=1e-6)
    np.testing.assert_array_equal(q, [[127, -64, 0], [0, 0, 0], [-127, 64, 0]])
    err = np.abs(q * scale[:, None] - x).max(axis=-1)
    assert np.all(err <= scale / 2 + 1e-6)


def test_int8_rows_of_a_batch_keep_their_leading_axes() -> None:
    x = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    q, scale = quantize_rows_int8(x)
    assert q.shape == (2, 5, 7) and scale.shape == (2, 5)
    assert np.all(np.abs(q).max(-1) == 127)
    np.testing.assert_allclose(q * scale[..., None], x, atol=float(scale.max()) / 2 + 1e-6)


def test_u8log_clips_tiny_positive_log_probabilities_to_code_0() -> None:
    """A float32 log-softmax can come out slightly above 0; it must not wrap around the uint8."""
    codes = encode_values(np.array([1e-6, 0.4, 3.0], dtype=np.float32), ValueEncoding("u8log", 1 / 16))
    np.testing.assert_array_equal(codes, [0, 0, 0])


def test_u8log_encodes_the_float32_value_of_its_input() -> None:
    """Codes are defined on float32 log-probabilities (what extraction produces), whatever the input dtype."""
    enc = ValueEncoding("u8log", 1 / 16)
    x64 = np.array([-0.03125000001, -0.09375000001])  # just past a half step in float64 only
    np.testing.assert_array_equal(encode_values(x64, enc), encode_values(x64.astype(np.float32), enc))
    np.testing.assert_array_equal(encode_values(x64, enc), [0, 2])  # float32: exact half steps, to even


def test_int8_of_an_all_zero_row_never_divides_by_zero() -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    x[1, 2] = 3.0
    with np.errstate(all="raise"):
        q, scale = quantize_rows_int8(x)
    np.testing.assert_array_equal(q, [[0, 0, 0, 0], [0, 0, 127, 0]])
    np.testing.assert_array_equal(scale, np.array([0.0, 3.0 / 127.0], dtype=np.float32))


def test_int8_codes_are_those_of_the_float32_values() -> None:
    x64 = np.array([[127.0, 0.5 + 1e-12]])  # 0.5 + 1e-12 rounds up in float64 only
    q, _ = quantize_rows_int8(x64)
    np.testing.assert_array_equal(q, quantize_rows_int8(x64.astype(np.float32))[0])
    np.testing.assert_array_equal(q, [[127, 0]])
