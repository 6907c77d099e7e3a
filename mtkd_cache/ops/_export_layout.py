"""Which rows of which grid each exported array holds, per sample (export and import share it).

An array of the inputs, or of a teacher on the inputs' grid, lives on the inputs' chunk grid; a
tokenization's `token_ids` / `byte_ends`, and the arrays of a cross-tokenizer teacher that ran on
it (`teacher.json` names it), live on that tokenization's grid (docs/CROSS_TOKENIZER.md). Both
grids hold the same samples per chunk, so a cache chunk exports to one row group either way.
A tokenization's `vocab_map` belongs to no sample: it travels whole (`WHOLE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtkd_cache.format.layout import ChunkGrid, chunk_rows

__all__ = ["WHOLE", "Layout", "layout_finder"]

WHOLE = "mtkd/whole"
"""Prefix, in the export's small-files table, of arrays exported whole (`.npy` bytes, no pickle)."""


@dataclass(frozen=True)
class Layout:
    """A grid and, per sample, its first row and its number of rows on it."""

    grid: ChunkGrid
    offset: np.ndarray
    length: np.ndarray

    def on(self, arr: Any) -> str:
        return "token" if arr.shape[0] == self.grid.shape_of("token")[0] else "sample"

    def spans(self, arr: Any, chunk: int) -> tuple[int, list[tuple[int, int]]]:
        """(first row of `chunk` on the array's grid, each sample's [start, stop) from that row)."""
        s0, s1 = self.grid.sample_range(chunk)
        on = self.on(arr)
        r0 = chunk_rows(self.grid, chunk, on)[0]
        if on == "sample":
            return r0, [(i, i + 1) for i in range(s1 - s0)]
        starts = self.offset[s0:s1].astype(np.int64) - r0
        return r0, [(int(a), int(a + n)) for a, n in zip(starts, self.length[s0:s1], strict=True)]


def layout_finder(read_json: Callable[[str], dict], read_table: Callable[[str], Any],
                  inputs_grid: ChunkGrid) -> Callable[[str], Layout | None]:
    """path of a zarr array -> its `Layout`, or None for an array that travels whole."""
    cache: dict[str | None, Layout] = {}
    on_tokenization: dict[str, str | None] = {}  # teacher -> the tokenization teacher.json names

    def teacher_tokenization(name: str) -> str | None:
        if name not in on_tokenization:  # one read of teacher.json per teacher, not per array
            on_tokenization[name] = read_json(f"teachers/{name}/teacher.json").get("tokenization")
        return on_tokenization[name]

    def layout(tid: str | None) -> Layout:
        if tid not in cache:
            folder = "inputs" if tid is None else f"tokenizations/{tid}"
            grid = inputs_grid if tid is None else ChunkGrid.from_dict(read_json(f"{folder}/tokenization.json")["grid"])
            table = read_table(f"{folder}/samples.parquet")
            cache[tid] = Layout(grid, table.column("offset").to_numpy(), table.column("num_positions").to_numpy())
        return cache[tid]

    def find(path: str) -> Layout | None:
        parts = path.split("/")
        if parts[0] == "tokenizations":
            return None if parts[-1] == "vocab_map" else layout(parts[1])
        if parts[0] == "teachers":
            return layout(teacher_tokenization(parts[1]))
        return layout(None)

    return find
