"""Where rows live: the chunk grid, the token/sample grid rule, chunk row ranges and shard keys.

The one home of these rules; the writer, the reader, verify and the trainer's batch builder ask
here rather than re-deriving them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from mtkd_cache.errors import CacheFormatError
from mtkd_cache.format._parse import parse_int, parse_positive, req

__all__ = ["ChunkGrid", "GridName", "chunk_of_row", "chunk_rows", "feature_grid", "inner_divisor", "make_grid", "shard_key"]

GridName = Literal["token", "sample"]


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
        parse_int(self.num_samples, "chunk grid: num_samples")
        for name in ("num_chunks", "chunk_samples", "chunk_positions", "inner_samples", "inner_positions"):
            parse_positive(getattr(self, name), f"chunk grid: {name}")
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

    def shape_of(self, on: str) -> tuple[int, int, int]:
        """(total rows, rows per chunk = shard, rows per inner zarr chunk) of an array on grid `on`."""
        if on == "token":
            return self.total_positions, self.chunk_positions, self.inner_positions
        return self.total_sample_rows, self.chunk_samples, self.inner_samples

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkGrid:
        w = "inputs.json grid"
        return cls(**{f.name: req(d, f.name, int, w) for f in dataclasses.fields(cls)})


def feature_grid(teacher_grid: str, pool: str) -> GridName:
    """The grid of a feature: per position only for unpooled features of a token-grid teacher."""
    return "token" if pool == "none" and teacher_grid == "token" else "sample"


def chunk_rows(grid: ChunkGrid, chunk: int, on: str) -> tuple[int, int]:
    """Rows [r0, r1) that chunk `chunk` reserves in an array on grid `on` ("token" or "sample")."""
    if on == "token":
        return grid.position_range(chunk)
    return chunk * grid.chunk_samples, (chunk + 1) * grid.chunk_samples


def chunk_of_row(grid: ChunkGrid, row: int, on: str) -> int:
    """The chunk (= shard) holding row `row` of an array on grid `on`."""
    return row // (grid.chunk_positions if on == "token" else grid.chunk_samples)


def shard_key(array_key: str, chunk: int, ndim: int) -> str:
    """The storage key of chunk `chunk`'s shard of an `ndim`-d array (zarr v3 default key encoding)."""
    return f"{array_key}/c/{chunk}" + "/0" * (ndim - 1)


def inner_divisor(chunk: int, row_units: int, target_units: int) -> int:
    """The largest divisor g of `chunk` with g * row_units <= target_units (at least 1)."""
    best = 1
    for g in range(1, chunk + 1):
        if chunk % g == 0 and g * row_units <= target_units:
            best = g
    return best


def make_grid(num_samples: int, chunk_samples: int, positions_per_sample: int, inner_target: int = 8192) -> ChunkGrid:
    """A grid of `chunk_samples` samples per chunk with `positions_per_sample` rows reserved each.

    Inner (zarr) chunks hold about `inner_target` position rows, so a random read decodes
    little more than it needs while a shard is one object per array per chunk.
    """
    if chunk_samples <= 0:
        raise ValueError(f"--chunk-samples must be positive, got {chunk_samples}")
    g = inner_divisor(chunk_samples, positions_per_sample, inner_target)
    return ChunkGrid(
        num_samples=num_samples,
        num_chunks=max(1, -(-num_samples // chunk_samples)),
        chunk_samples=chunk_samples,
        chunk_positions=chunk_samples * positions_per_sample,
        inner_samples=g,
        inner_positions=g * positions_per_sample,
    )
