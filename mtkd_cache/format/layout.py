"""Choosing the chunk grid and laying samples out on it."""

from __future__ import annotations

from mtkd_cache.format.meta import ChunkGrid

__all__ = ["make_grid", "inner_divisor"]


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
