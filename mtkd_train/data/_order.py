"""The deterministic global sample order of a training stream (pure: no I/O).

Epoch `e` of a cache of N samples in C chunks of `chunk_samples`, with `lanes` L:

1. the chunks are permuted by a generator seeded with (seed, e) and dealt to the lanes: lane l
   gets the permuted chunks l, l + L, l + 2L, ...;
2. each lane's chunks are cut into windows of `shuffle_chunks` consecutive chunks, and the
   samples of each window are permuted by a generator seeded with (seed, e, 1, window[, lane]);
3. the epoch interleaves the lanes one sample at a time (lane 0, 1, ..., L-1, lane 0, ...) while
   every lane has samples left (the *round-robin part*, m·L positions for the shortest lane's m
   samples); the lanes' leftover samples (the *tail*, at most about one window per lane) follow
   in lane order.

So a reader only ever needs the chunks of one window per lane at a time (a bounded shuffle
buffer), and the order depends on nothing but (seed, epoch, grid, lanes): not on ranks, workers
or batch size. Lanes let ranks decode disjoint chunks: in the round-robin part any L·q
consecutive positions hold q samples of every lane, so a rank that owns whole lanes trains on
its share of each global batch and decodes only its lanes' chunks (see `CachedDistillDataset`).
With one lane this is a plain bounded shuffle; with shuffle off and one lane the order is
0..N-1. The stream is the concatenation of epochs 0, 1, 2, ...; a position in it is
`epoch * N + offset`.

Cost: O(C) per epoch for the chunk permutation and window bounds, O(window samples) for a
window's permutation; all are memoised for the few most recent keys.
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
        shuffle: Permute chunks and samples; off keeps chunk and sample order.
        shuffle_chunks: Chunks per shuffle window (the shuffle buffer per lane, in chunks).
        lanes: Interleaved lanes of disjoint chunks (L); ranks that own whole lanes decode
            disjoint chunks. Part of the order: resuming keeps the saved value.
    """

    num_samples: int
    chunk_samples: int
    seed: int = 0
    shuffle: bool = True
    shuffle_chunks: int = 4
    lanes: int = 1

    def __post_init__(self) -> None:
        for name in ("num_samples", "chunk_samples", "shuffle_chunks", "lanes"):
            if getattr(self, name) < 1:
                raise StreamConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise StreamConfigError(f"seed must be >= 0, got {self.seed}; use a non-negative seed")

    @classmethod
    def from_grid(
        cls, grid: ChunkGrid, *, seed: int = 0, shuffle: bool = True, shuffle_chunks: int = 4,
        lanes: int = 1,
    ) -> SampleOrder:
        """The order over a cache's chunk grid (`CacheReader.inputs.grid`)."""
        return cls(grid.num_samples, grid.chunk_samples, seed, shuffle, shuffle_chunks, lanes)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    @property
    def window_chunks(self) -> int:
        """Chunks per window; 1 without shuffle (chunks are then read one after the other)."""
        return self.shuffle_chunks if self.shuffle else 1

    def chunk_order(self, epoch: int) -> np.ndarray:
        """Chunk ids in the permuted order of epoch `epoch` (before dealing), (C,) int64."""
        return _chunk_order(self, epoch)

    def lane_chunks(self, epoch: int, lane: int = 0) -> np.ndarray:
        """The chunks lane `lane` reads in epoch `epoch`, in order, int64."""
        return self.chunk_order(epoch)[lane :: self.lanes]

    def window_bounds(self, epoch: int, lane: int = 0) -> np.ndarray:
        """Lane offsets where each of the lane's windows starts, plus the lane's sample count."""
        return _window_bounds(self, epoch, lane)

    def window_of(self, epoch: int, offset: int, lane: int = 0) -> int:
        """Index of the lane's window holding lane offset `offset`."""
        return int(np.searchsorted(self.window_bounds(epoch, lane), offset, side="right")) - 1

    def window_samples(self, epoch: int, window: int, lane: int = 0) -> np.ndarray:
        """Sample ids of one window of a lane in stream order, int64 (read-only)."""
        return _window_samples(self, epoch, window, lane)

    def lane_sizes(self, epoch: int) -> np.ndarray:
        """Samples per lane in epoch `epoch`, (L,) int64."""
        return np.array([int(self.window_bounds(epoch, lane)[-1]) for lane in range(self.lanes)])

    def round_robin_end(self, epoch: int) -> int:
        """Epoch offset where the round-robin part ends and the tail starts (m·L)."""
        return int(self.lane_sizes(epoch).min()) * self.lanes

    def locate(self, epoch: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lane, lane offset, in the round-robin part) of each epoch offset, int64/bool arrays."""
        offsets = np.asarray(offsets, dtype=np.int64)
        sizes, n_lanes = self.lane_sizes(epoch), self.lanes
        m = int(sizes.min())
        rr = offsets < m * n_lanes
        lane, pos = offsets % n_lanes, offsets // n_lanes
        if not rr.all():
            extra = np.concatenate([[0], np.cumsum(sizes - m)])
            t = offsets[~rr] - m * n_lanes
            tail_lane = np.searchsorted(extra, t, side="right") - 1
            lane[~rr], pos[~rr] = tail_lane, m + t - extra[tail_lane]
        return lane, pos, rr

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
        if not self.shuffle and self.lanes == 1:
            return np.arange(start, stop, dtype=np.int64)
        lane, pos, _ = self.locate(epoch, np.arange(start, stop))
        out = np.empty(stop - start, dtype=np.int64)
        for ln in np.unique(lane).tolist():
            at = np.flatnonzero(lane == ln)
            bounds = self.window_bounds(epoch, ln)
            win = np.searchsorted(bounds, pos[at], side="right") - 1
            for w in np.unique(win).tolist():
                sel = at[win == w]
                out[sel] = self.window_samples(epoch, w, ln)[pos[sel] - bounds[w]]
        return out

    def stream_samples(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at stream positions [start, stop), crossing epochs as needed; int64."""
        return self._per_epoch(start, stop, self.samples)

    def stream_lanes(self, start: int, stop: int) -> np.ndarray:
        """Lane of each stream position in [start, stop), or -1 for positions in an epoch's tail."""

        def lanes(epoch: int, a: int, b: int) -> np.ndarray:
            lane, _, rr = self.locate(epoch, np.arange(a, b))
            return np.where(rr, lane, -1)

        return self._per_epoch(start, stop, lanes)

    def _per_epoch(self, start: int, stop: int, fn: object) -> np.ndarray:
        n, parts = self.num_samples, []
        while start < stop:
            epoch, offset = divmod(start, n)
            take = min(stop - start, n - offset)
            parts.append(fn(epoch, offset, offset + take))  # type: ignore[operator]
            start += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- chunk schedule ---------------------------------------------------------------------------
    def schedule_index(self, position: int) -> int:
        """Index, in the stream's chunk schedule, of the first chunk a reader at `position` may need.

        The chunk schedule is `schedule(0)`, then `schedule(1)`, ... (C entries per epoch); a
        reader that has reached `position` never again needs a chunk earlier in it.
        """
        epoch, offset = divmod(position, self.num_samples)
        sizes, n_lanes = self.lane_sizes(epoch), self.lanes
        m = int(sizes.min())
        if offset < m * n_lanes:
            progress = offset // n_lanes + (np.arange(n_lanes) < offset % n_lanes)
        else:
            extra = np.concatenate([[0], np.cumsum(sizes - m)])
            progress = m + np.clip(offset - m * n_lanes - extra[:-1], 0, sizes - m)
        rows = [self.window_of(epoch, min(int(p), int(s) - 1), ln)
                for ln, (p, s) in enumerate(zip(progress, sizes)) if s > 0]
        starts = _schedule(self, epoch)[2]
        return epoch * self.num_chunks + int(starts[min(rows)])

    def scheduled_chunk(self, index: int) -> int:
        """The chunk at `index` of the stream's chunk schedule."""
        epoch, k = divmod(index, self.num_chunks)
        return int(_schedule(self, epoch)[0][k])

    def scheduled_lane(self, index: int) -> int:
        """The lane of the chunk at `index` of the stream's chunk schedule."""
        epoch, k = divmod(index, self.num_chunks)
        return int(_schedule(self, epoch)[1][k])


def _seed(order: SampleOrder, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([order.seed, *keys]))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@lru_cache(maxsize=4)
def _chunk_order(order: SampleOrder, epoch: int) -> np.ndarray:
    out = (
        _seed(order, epoch, 0).permutation(order.num_chunks)
        if order.shuffle
        else np.arange(order.num_chunks)
    ).astype(np.int64)
    return _frozen(out)


@lru_cache(maxsize=64)
def _window_bounds(order: SampleOrder, epoch: int, lane: int) -> np.ndarray:
    chunks = order.lane_chunks(epoch, lane)
    if not len(chunks):
        return _frozen(np.zeros(1, dtype=np.int64))
    sizes = np.minimum(order.chunk_samples, order.num_samples - chunks * order.chunk_samples)
    starts = np.arange(0, len(chunks), order.window_chunks)
    per_window = np.add.reduceat(sizes, starts)
    return _frozen(np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64))


@lru_cache(maxsize=64)
def _window_samples(order: SampleOrder, epoch: int, window: int, lane: int) -> np.ndarray:
    k = order.window_chunks
    chunks = order.lane_chunks(epoch, lane)[window * k : (window + 1) * k]
    if not len(chunks) or window < 0:
        raise IndexError(f"window {window} is out of range for epoch {epoch} (lane {lane})")
    ids = np.concatenate(
        [
            np.arange(
                c * order.chunk_samples, min((c + 1) * order.chunk_samples, order.num_samples)
            )
            for c in chunks.tolist()
        ]
    ).astype(np.int64)
    if order.shuffle:
        keys = (epoch, 1, window) if order.lanes == 1 else (epoch, 1, window, lane)
        ids = _seed(order, *keys).permutation(ids)
    return _frozen(ids)


@lru_cache(maxsize=4)
def _schedule(order: SampleOrder, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chunks, lanes, row starts) of an epoch's schedule: row i holds every lane's window i."""
    k = order.window_chunks
    chunks: list[int] = []
    lanes: list[int] = []
    starts: list[int] = []
    per_lane = [order.lane_chunks(epoch, ln) for ln in range(order.lanes)]
    rows = max(-(-len(c) // k) for c in per_lane)
    for i in range(rows):
        starts.append(len(chunks))
        for ln, lane_chunks in enumerate(per_lane):
            part = lane_chunks[i * k : (i + 1) * k].tolist()
            chunks += part
            lanes += [ln] * len(part)
    return (_frozen(np.array(chunks, dtype=np.int64)), _frozen(np.array(lanes, dtype=np.int64)),
            _frozen(np.array(starts, dtype=np.int64)))
