"""Whole-shard reads (format/shards.py) return exactly zarr's rows and check every byte they decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from mtkd_cache.format.codecs import Compressor, chunk_codecs
from mtkd_cache.format.shards import ShardedArray, shard_layout
from mtkd_cache.format.store import CacheStore, MissingChunkError

SHARD, INNER, SHARDS = 64, 16, 3


def make_array(root: Path, key: str, dtype: str, row_shape: tuple[int, ...], compressor: Compressor,
               seed: int = 0, crc: bool = True) -> tuple[ShardedArray, np.ndarray]:
    """A sharded array laid out as mtkd writes it, filled with random values; and those values."""
    rng = np.random.default_rng(seed)
    shape = (SHARD * SHARDS, *row_shape)
    data = (rng.standard_normal(shape) * 50).astype(dtype) if np.dtype(dtype).kind == "f" \
        else rng.integers(0, 200, size=shape).astype(dtype)
    data[INNER:2 * INNER] = 0  # an inner chunk of fill values only
    arr = zarr.create_array(str(root / key), shape=shape, dtype=dtype, chunks=(INNER, *row_shape),
                            shards=(SHARD, *row_shape), fill_value=0,
                            serializer="auto", compressors=chunk_codecs(compressor) if crc else ZstdCodec(level=3),
                            config={"write_empty_chunks": True})
    arr[:] = data
    return ShardedArray(CacheStore(root), key, zarr.open_array(str(root / key), mode="r")), data


@pytest.mark.parametrize("compressor", [Compressor("zstd", 3), Compressor("blosc", 5)], ids=["zstd", "blosc"])
@pytest.mark.parametrize(("dtype", "row_shape"), [("uint16", (8,)), ("uint8", (5,)), ("float16", ()),
                                                  ("uint32", (3,)), ("int8", (4,)), ("float32", ())])
def test_whole_shard_reads_equal_zarr(tmp_path: Path, compressor: Compressor, dtype: str,
                                      row_shape: tuple[int, ...]) -> None:
    sharded, data = make_array(tmp_path, "a", dtype, row_shape, compressor)
    assert sharded.layout is not None and sharded.layout.inner_per_shard == SHARD // INNER
    for start, stop in [(0, SHARD), (SHARD, 2 * SHARD), (SHARD + 5, 2 * SHARD - 3), (2 * SHARD, 2 * SHARD + 40),
                        (3, 40), (SHARD + 20, SHARD + 30)]:  # the last is short: read through zarr
        got = sharded[start:stop]
        assert got.dtype == data.dtype and got.shape == data[start:stop].shape
        np.testing.assert_array_equal(got, data[start:stop])
        np.testing.assert_array_equal(got, sharded.array[start:stop])


def test_other_layouts_are_read_through_zarr(tmp_path: Path) -> None:
    sharded, data = make_array(tmp_path, "v1", "uint16", (4,), Compressor(), crc=False)
    assert sharded.layout is None  # no crc32c: not the layout mtkd writes
    np.testing.assert_array_equal(sharded[0:SHARD], data[:SHARD])


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["inner chunk", "index"])
def test_a_flipped_bit_is_a_checksum_mismatch(tmp_path: Path, where: str) -> None:
    sharded, _ = make_array(tmp_path, "a", "uint16", (8,), Compressor())
    shard = tmp_path / "a/c/1/0"
    _flip(shard, 10 if where == "inner chunk" else shard.stat().st_size - 20)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sharded[SHARD:2 * SHARD]
    sharded[0:SHARD]  # other shards still read


def test_a_truncated_or_missing_shard_fails(tmp_path: Path) -> None:
    sharded, data = make_array(tmp_path, "a", "uint8", (5,), Compressor())
    shard = tmp_path / "a/c/2/0"
    shard.write_bytes(shard.read_bytes()[:30])
    with pytest.raises(ValueError, match="shorter than its index|checksum"):
        sharded[2 * SHARD:3 * SHARD]
    shard.unlink()
    with pytest.raises(MissingChunkError):
        sharded[2 * SHARD:3 * SHARD]
    lenient = ShardedArray(sharded.store, "a", sharded.array, strict=False)  # the reader's check=False
    assert (lenient[2 * SHARD:3 * SHARD] == 0).all()
    np.testing.assert_array_equal(lenient[0:SHARD], data[:SHARD])


def test_layout_of_a_cache_array(tmp_path: Path) -> None:
    sharded, _ = make_array(tmp_path, "a", "uint16", (8,), Compressor())
    lay = shard_layout(sharded.array)
    assert lay is not None
    assert (lay.shard_rows, lay.inner_rows, lay.row_shape, lay.dtype) == (SHARD, INNER, (8,), np.dtype("uint16"))
