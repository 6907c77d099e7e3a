"""Each epoch draws a new chunk order, and so new shuffle windows: the within-window sample shuffle
alone would hide a chunk order that repeats every epoch (the same chunks would always be mixed
together, and always in the same part of the epoch).
"""

from __future__ import annotations

import numpy as np
import pytest

from mtkd_cache import ChunkGrid
from mtkd_train.data import SampleOrder


def _windows(order: SampleOrder, epoch: int) -> set[frozenset[int]]:
    """The chunks of each shuffle window of `epoch`, as a set of sets."""
    chunks, k = order.chunk_order(epoch).tolist(), order.window_chunks
    return {frozenset(chunks[i : i + k]) for i in range(0, len(chunks), k)}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_chunk_order_differs_between_epochs(seed: int) -> None:
    order = SampleOrder(160, 8, seed=seed, shuffle_chunks=4)  # 20 chunks
    orders = [order.chunk_order(e).tolist() for e in range(4)]
    for e in range(4):
        assert sorted(orders[e]) == list(range(20))
    assert len({tuple(o) for o in orders}) == 4


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shuffle_windows_group_other_chunks_each_epoch(seed: int) -> None:
    order = SampleOrder(160, 8, seed=seed, shuffle_chunks=4)
    groups = [_windows(order, e) for e in range(4)]
    for e in range(1, 4):
        assert groups[e] != groups[0]
        assert len(groups[e] & groups[0]) < 5 - 1, "most windows mix other chunks"


def test_window_samples_follow_the_epochs_chunk_order() -> None:
    order = SampleOrder(160, 8, seed=3, shuffle_chunks=4)
    for epoch in (0, 1):
        chunks = order.chunk_order(epoch)
        for w in range(5):
            got = set((order.window_samples(epoch, w) // 8).tolist())
            assert got == set(chunks[4 * w : 4 * w + 4].tolist())
    first = [set(order.window_samples(e, 0).tolist()) for e in (0, 1)]
    assert first[0] != first[1]


def test_windows_of_a_partial_last_chunk_are_bounded_by_real_samples() -> None:
    order = SampleOrder(37, 8, seed=2, shuffle_chunks=2)  # chunks of 8, 8, 8, 8, 5
    for epoch in range(3):
        chunks = order.chunk_order(epoch)
        bounds = order.window_bounds(epoch)
        sizes = [5 if c == 4 else 8 for c in chunks.tolist()]
        want = np.concatenate([[0], np.cumsum([sum(sizes[i : i + 2]) for i in range(0, 5, 2)])])
        np.testing.assert_array_equal(bounds, want)
        assert len(order.window_samples(epoch, 2)) == sizes[4]
        with pytest.raises(IndexError, match="window 3 is out of range"):
            order.window_samples(epoch, 3)


def test_stream_schedule_reads_each_epochs_own_chunk_order() -> None:
    order = SampleOrder(48, 8, seed=5, shuffle_chunks=2)  # 6 chunks
    schedule = [order.scheduled_chunk(i) for i in range(12)]
    assert schedule[:6] == order.chunk_order(0).tolist()
    assert schedule[6:] == order.chunk_order(1).tolist()
    assert schedule[:6] != schedule[6:]
    # position 50 is epoch 1, offset 2: the first window of epoch 1 starts at schedule index 6
    assert order.schedule_index(50) == 6
    assert order.schedule_index(48 + 16) == 6 + 2


def test_the_order_is_recomputed_identically_once_its_memo_is_evicted() -> None:
    """Determinism comes from the seeds, not from the lru_cache that memoises the last epochs."""
    order = SampleOrder(96, 8, seed=11, shuffle_chunks=3)
    first = (order.chunk_order(0).copy(), order.samples(0).copy())
    for epoch in range(1, 12):  # more keys than any memo holds
        order.samples(epoch)
    np.testing.assert_array_equal(order.chunk_order(0), first[0])
    np.testing.assert_array_equal(order.samples(0), first[1])
    other_seed = SampleOrder(96, 8, seed=12, shuffle_chunks=3)
    assert not np.array_equal(other_seed.chunk_order(0), first[0])


def test_from_grid_takes_the_grid_sizes() -> None:
    grid = ChunkGrid(num_samples=37, num_chunks=5, chunk_samples=8, chunk_positions=128,
                     inner_samples=8, inner_positions=128)  # fmt: skip
    order = SampleOrder.from_grid(grid, seed=4, shuffle=False, shuffle_chunks=2)
    assert order == SampleOrder(37, 8, seed=4, shuffle=False, shuffle_chunks=2)
    assert SampleOrder.from_grid(grid) == SampleOrder(37, 8, seed=0, shuffle=True, shuffle_chunks=4)
    assert order.num_chunks == 5


@pytest.mark.parametrize("shuffle", [True, False])
def test_empty_slices_are_empty_int64_arrays(shuffle: bool) -> None:
    order = SampleOrder(40, 8, seed=1, shuffle=shuffle, shuffle_chunks=2)
    for got in (order.samples(0, 5, 5), order.samples(1, 40, 40), order.stream_samples(45, 45)):
        assert got.dtype == np.int64 and got.shape == (0,)
    np.testing.assert_array_equal(order.samples(0, 3, 7), order.samples(0)[3:7])
    if not shuffle:
        np.testing.assert_array_equal(order.samples(0, 3, 7), [3, 4, 5, 6])


@pytest.mark.parametrize(("epoch", "start", "stop"), [(0, 5, 3), (0, 0, 41), (0, -1, 4), (-1, 0, 4)])
def test_offsets_outside_the_epoch_are_refused(epoch: int, start: int, stop: int) -> None:
    for shuffle in (True, False):
        order = SampleOrder(40, 8, seed=1, shuffle=shuffle)
        with pytest.raises(IndexError, match=rf"offsets \[{start}, {stop}\) of epoch {epoch} are outside \[0, 40\)"):
            order.samples(epoch, start, stop)
