"""The deterministic global sample order of a training stream (pure: no I/O).

Epoch `e` of a cache of N samples in C chunks of `chunk_samples`:

1. the chunks are permuted by a generator seeded with (seed, e);
2. the permuted chunks are cut into windows of `shuffle_chunks` consecutive chunks, and the
   samples of each window are permuted by a generator seeded with (seed, e, window).

So a reader only ever needs the chunks of one window at a time (a bounded shuffle buffer), and the
order depends on nothing but (seed, epoch, grid): not on ranks, workers or batch size. With
shuffle off the order is 0..N-1. The stream is the concatenation of epochs 0, 1, 2, ...; a
position in it is `epoch * N + offset`.

Cost: O(C) per epoch for the chunk permutation and window bounds, O(window samples) for a
window's permutation; both are memoised for the few most recent keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mtkd_cache import ChunkGrid
from mtkd_train.data._errors import StreamConfigError

__all__ = ["SampleOrder"]


@dataclass(frozen=True)
class SampleOrder:
    """The sample sequence of every epoch of a stream over a chunked cache.

    Attributes:
        num_samples: Samples in the cache (N).
        chunk_samples: Samples per chunk; the last chunk may hold fewer.
        seed: Non-negative seed of the permutations.
        shuffle: Permute chunks and samples; off gives 0..N-1 every epoch.
        shuffle_chunks: Chunks per shuffle window (the shuffle buffer, in chunks).
    """

    num_samples: int
    chunk_samples: int
    seed: int = 0
    shuffle: bool = True
    shuffle_chunks: int = 4

    def __post_init__(self) -> None:
        for name in ("num_samples", "chunk_samples", "shuffle_chunks"):
            if getattr(self, name) < 1:
                raise StreamConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise StreamConfigError(f"seed must be >= 0, got {self.seed}; use a non-negative seed")

    @classmethod
    def from_grid(
        cls, grid: ChunkGrid, *, seed: int = 0, shuffle: bool = True, shuffle_chunks: int = 4
    ) -> SampleOrder:
        """The order over a cache's chunk grid (`CacheReader.inputs.grid`)."""
        return cls(grid.num_samples, grid.chunk_samples, seed, shuffle, shuffle_chunks)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    @property
    def window_chunks(self) -> int:
        """Chunks per window; 1 without shuffle (chunks are then read one after the other)."""
        return self.shuffle_chunks if self.shuffle else 1

    def chunk_order(self, epoch: int) -> np.ndarray:
        """Chunk ids in the order epoch `epoch` reads them, (C,) int64 (read-only)."""
        return _chunk_order(self, epoch)

    def window_bounds(self, epoch: int) -> np.ndarray:
        """Epoch offsets where each window starts, plus N at the end: (num_windows + 1,) int64."""
        return _window_bounds(self, epoch)

    def window_of(self, epoch: int, offset: int) -> int:
        """Index of the window holding epoch offset `offset` (0 <= offset < N)."""
        return int(np.searchsorted(self.window_bounds(epoch), offset, side="right")) - 1

    def window_samples(self, epoch: int, window: int) -> np.ndarray:
        """Sample ids of one window in stream order, (window samples,) int64 (read-only)."""
        return _window_samples(self, epoch, window)

    def samples(self, epoch: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Sample ids at epoch offsets [start, stop), (stop - start,) int64.

        Args:
            epoch: Epoch number (>= 0).
            start: First offset, 0 <= start <= N.
            stop: End offset (exclusive), start <= stop <= N; default N.
        """
        stop = self.num_samples if stop is None else stop
        if not 0 <= start <= stop <= self.num_samples or epoch < 0:
            raise IndexError(
                f"offsets [{start}, {stop}) of epoch {epoch} are outside [0, {self.num_samples})"
            )
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        bounds = self.window_bounds(epoch)
        parts = []
        w = self.window_of(epoch, start) if start < stop else 0
        while start < stop:
            lo, hi = int(bounds[w]), int(bounds[w + 1])
            take = min(stop, hi)
            parts.append(self.window_samples(epoch, w)[start - lo : take - lo])
            start, w = take, w + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def stream_samples(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at stream positions [start, stop), crossing epochs as needed; int64."""
        n, parts = self.num_samples, []
        while start < stop:
            epoch, offset = divmod(start, n)
            take = min(stop - start, n - offset)
            parts.append(self.samples(epoch, offset, offset + take))
            start += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def schedule_index(self, position: int) -> int:
        """Index, in the stream's chunk schedule, of the first chunk of the window holding `position`.

        The chunk schedule is `chunk_order(0)`, then `chunk_order(1)`, ...; a reader that has
        reached `position` never again needs a chunk earlier in the schedule than this index.
        """
        epoch, offset = divmod(position, self.num_samples)
        return epoch * self.num_chunks + self.window_of(epoch, offset) * self.window_chunks

    def scheduled_chunk(self, index: int) -> int:
        """The chunk at `index` of the stream's chunk schedule."""
        epoch, k = divmod(index, self.num_chunks)
        return int(self.chunk_order(epoch)[k])


def _seed(order: SampleOrder, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([order.seed, *keys]))


@lru_cache(maxsize=4)
def _chunk_order(order: SampleOrder, epoch: int) -> np.ndarray:
    out = (
        _seed(order, epoch, 0).permutation(order.num_chunks)
        if order.shuffle
        else np.arange(order.num_chunks)
    ).astype(np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=4)
def _window_bounds(order: SampleOrder, epoch: int) -> np.ndarray:
    chunks = order.chunk_order(epoch)
    sizes = np.minimum(order.chunk_samples, order.num_samples - chunks * order.chunk_samples)
    starts = np.arange(0, len(chunks), order.window_chunks)
    per_window = np.add.reduceat(sizes, starts)
    out = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=8)
def _window_samples(order: SampleOrder, epoch: int, window: int) -> np.ndarray:
    k = order.window_chunks
    chunks = order.chunk_order(epoch)[window * k : (window + 1) * k]
    if not len(chunks):
        raise IndexError(f"window {window} is out of range for epoch {epoch}")
    ids = np.concatenate(
        [
            np.arange(
                c * order.chunk_samples, min((c + 1) * order.chunk_samples, order.num_samples)
            )
            for c in chunks.tolist()
        ]
    ).astype(np.int64)
    if order.shuffle:
        ids = _seed(order, epoch, 1, window).permutation(ids)
    ids.flags.writeable = False
    return ids
