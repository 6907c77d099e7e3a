"""Decoded chunks for one reading process: a count-bounded LRU plus read-ahead in a thread.

The stream tells the cache which chunk it needs (`get`) and how far it has got in the chunk
schedule (`release_before`); a single background thread decodes the next `prefetch` scheduled
chunks that are not already held. Decoded chunks live either in the LRU (at most `capacity`)
or in flight (at most `prefetch`, plus one read that was abandoned mid-way), so memory is bounded
by (capacity + prefetch + 1) chunks whatever the cache size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from mtkd_cache import ChunkData
from mtkd_train.data._errors import StreamConfigError

__all__ = ["ChunkCache", "ChunkCacheStats"]


@dataclass
class ChunkCacheStats:
    """Counters of one `ChunkCache`, for tests and throughput reports.

    Attributes:
        reads: Chunks decoded (in the consumer or the read-ahead thread).
        decoded: Times each chunk id was decoded (its keys are the chunks this process read).
        hits: `get` calls served from the LRU.
        prefetch_hits: `get` calls served by a read-ahead.
        peak_cached: Most decoded chunks the LRU ever held (never above `capacity`).
        peak_in_flight: Most read-aheads ever pending or running at once.
    """

    reads: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    peak_cached: int = 0
    peak_in_flight: int = 0
    decoded: dict[int, int] = field(default_factory=dict)


class ChunkCache:
    """LRU of decoded chunks with read-ahead along a chunk schedule.

    Args:
        read: Decodes one chunk (e.g. `functools.partial(reader.read_chunk, teachers=...)`).
        schedule: Chunk at a schedule index (`SampleOrder.scheduled_chunk`), or None for an entry
            this process does not read (another rank's lane).
        capacity: Most decoded chunks kept (>= 1).
        prefetch: Most chunks read ahead at once (0 = no thread).
        lookahead: How many schedule entries past the current window start the read-ahead may go.
        end: Schedule length (None = endless).
    """

    def __init__(
        self,
        read: Callable[[int], ChunkData],
        schedule: Callable[[int], int | None],
        *,
        capacity: int,
        prefetch: int,
        lookahead: int,
        end: int | None = None,
    ):
        if capacity < 1:
            raise StreamConfigError(f"cache_chunks must be >= 1, got {capacity}")
        if prefetch < 0:
            raise StreamConfigError(f"prefetch must be >= 0, got {prefetch}")
        self._read, self._schedule = read, schedule
        self.capacity, self.prefetch = capacity, prefetch
        self._lookahead, self._end = lookahead, end
        self._lru: OrderedDict[int, ChunkData] = OrderedDict()
        self._pending: OrderedDict[int, tuple[int, Future[ChunkData]]] = OrderedDict()
        self._abandoned: list[Future[ChunkData]] = []
        self._next = 0
        self._horizon = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mtkd-prefetch") if prefetch else None
        self.stats = ChunkCacheStats()
        self._lock = threading.Lock()

    @property
    def cached(self) -> list[int]:
        """Chunk ids held by the LRU, least recently used first."""
        return list(self._lru)

    def release_before(self, index: int) -> None:
        """Declare that no chunk earlier than schedule `index` will be asked for again."""
        self._horizon = max(self._horizon, index)
        for i in [i for i in self._pending if i < self._horizon]:
            _, fut = self._pending.pop(i)
            if not fut.cancel():
                self._abandoned.append(fut)
        self._next = max(self._next, self._horizon)
        self.fill()

    def get(self, chunk: int) -> ChunkData:
        """The decoded chunk, from the LRU, a finished read-ahead, or read now."""
        if chunk in self._lru:
            self._lru.move_to_end(chunk)
            self.stats.hits += 1
            return self._lru[chunk]
        fut = self._take_pending(chunk)
        if fut is not None:
            data = fut.result()
            self.stats.prefetch_hits += 1
        else:
            data = self._counted_read(chunk)
        while len(self._lru) >= self.capacity:
            self._lru.popitem(last=False)
        self._lru[chunk] = data
        self.stats.peak_cached = max(self.stats.peak_cached, len(self._lru))
        return data

    def fill(self) -> None:
        """Start read-aheads until `prefetch` are in flight or the lookahead is reached."""
        if self._pool is None:
            return
        self._abandoned = [f for f in self._abandoned if not f.done()]
        stop = self._horizon + self._lookahead
        if self._end is not None:
            stop = min(stop, self._end)
        while len(self._pending) + len(self._abandoned) < self.prefetch and self._next < stop:
            chunk = self._schedule(self._next)
            held = chunk in self._lru or any(c == chunk for c, _ in self._pending.values())
            if chunk is not None and not held:
                self._pending[self._next] = (chunk, self._pool.submit(self._counted_read, chunk))
            self._next += 1
        in_flight = len(self._pending) + len(self._abandoned)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, in_flight)

    def close(self) -> None:
        """Cancel read-aheads and stop the thread; the cache can no longer read ahead."""
        pool = getattr(self, "_pool", None)  # may run from __del__ at interpreter exit
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for name in ("_pending", "_lru"):
            if hasattr(self, name):
                getattr(self, name).clear()

    def _counted_read(self, chunk: int) -> ChunkData:
        data = self._read(chunk)
        with self._lock:  # the consumer and the read-ahead thread both count
            self.stats.reads += 1
            self.stats.decoded[chunk] = self.stats.decoded.get(chunk, 0) + 1
        return data

    def _take_pending(self, chunk: int) -> Future[ChunkData] | None:
        for i, (c, fut) in self._pending.items():
            if c == chunk:
                del self._pending[i]
                return fut
        return None
