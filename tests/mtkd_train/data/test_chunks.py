"""ChunkCache: count-bounded LRU with read-ahead along the chunk schedule (fake reads)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from mtkd_train.data import ChunkCache, StreamConfigError


class FakeReads:
    """Records which chunks were read; `gate` can hold the read-ahead thread."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, chunk: int) -> Any:
        self.gate.wait(5)
        self.calls.append(chunk)
        return {"chunk": chunk}


def test_lru_never_exceeds_capacity_and_evicts_least_recent() -> None:
    reads = FakeReads()
    cache = ChunkCache(reads, lambda i: i, capacity=2, prefetch=0, lookahead=1)
    for c in [0, 1, 0, 2, 0, 1, 3]:
        assert cache.get(c) == {"chunk": c}
        assert len(cache.cached) <= 2
    assert reads.calls == [0, 1, 2, 1, 3]  # 1 was least recent when 2 came in
    assert cache.cached == [1, 3] and cache.stats.peak_cached == 2 and cache.stats.hits == 2


def test_read_ahead_serves_later_gets_without_new_reads() -> None:
    reads = FakeReads()
    schedule = [5, 3, 7, 1]
    cache = ChunkCache(reads, schedule.__getitem__, capacity=1, prefetch=2, lookahead=4, end=4)
    cache.release_before(0)
    for c in schedule:
        assert cache.get(c) == {"chunk": c}
        cache.fill()
        assert cache.stats.peak_in_flight <= 2
    cache.close()
    assert sorted(reads.calls) == sorted(schedule)
    assert cache.stats.prefetch_hits >= 2 and cache.stats.reads == 4


def test_release_before_drops_read_aheads_that_will_not_be_used() -> None:
    reads = FakeReads()
    reads.gate.clear()  # hold the thread so the queued read-ahead can still be cancelled
    cache = ChunkCache(reads, lambda i: i, capacity=1, prefetch=2, lookahead=2)
    cache.release_before(0)  # queues chunks 0 and 1
    cache.release_before(2)  # neither will be needed any more: 1 is cancelled, 0 is running
    reads.gate.set()
    assert cache.get(2) == {"chunk": 2}
    time.sleep(0.05)
    cache.close()
    assert 1 not in reads.calls
    assert cache.stats.peak_in_flight <= 2


@pytest.mark.parametrize(("capacity", "prefetch"), [(0, 1), (1, -1)])
def test_bad_bounds_are_refused(capacity: int, prefetch: int) -> None:
    with pytest.raises(StreamConfigError):
        ChunkCache(FakeReads(), lambda i: i, capacity=capacity, prefetch=prefetch, lookahead=1)
