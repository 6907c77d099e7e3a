"""SampleOrder: a deterministic, bounded-shuffle permutation per epoch (pure, no cache)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mtkd_train.data import SampleOrder, StreamConfigError

CASES = [(61, 8, 3), (64, 8, 4), (5, 8, 4), (100, 7, 1), (33, 4, 20)]


@pytest.mark.parametrize(("n", "chunk", "window"), CASES)
def test_every_epoch_is_a_permutation(n: int, chunk: int, window: int) -> None:
    order = SampleOrder(n, chunk, seed=1, shuffle_chunks=window)
    for epoch in range(3):
        assert sorted(order.samples(epoch).tolist()) == list(range(n))


def test_shuffle_off_is_identity_every_epoch() -> None:
    order = SampleOrder(61, 8, seed=5, shuffle=False)
    for epoch in range(2):
        np.testing.assert_array_equal(order.samples(epoch), np.arange(61))
    np.testing.assert_array_equal(order.chunk_order(1), np.arange(8))


def test_order_depends_on_seed_and_epoch_only() -> None:
    a, b = SampleOrder(61, 8, seed=1), SampleOrder(61, 8, seed=1)
    np.testing.assert_array_equal(a.samples(2), b.samples(2))
    assert not np.array_equal(a.samples(0), a.samples(1))
    assert not np.array_equal(a.samples(0), SampleOrder(61, 8, seed=2).samples(0))


@pytest.mark.parametrize(("n", "chunk", "window"), CASES)
def test_windows_hold_exactly_their_chunks(n: int, chunk: int, window: int) -> None:
    order = SampleOrder(n, chunk, seed=3, shuffle_chunks=window)
    bounds, chunks, seq = order.window_bounds(0), order.chunk_order(0), order.samples(0)
    assert bounds[0] == 0 and bounds[-1] == n
    for w in range(len(bounds) - 1):
        got = set((seq[bounds[w] : bounds[w + 1]] // chunk).tolist())
        assert got == set(chunks[w * window : (w + 1) * window].tolist())


def test_slices_and_stream_positions_agree_with_whole_epochs() -> None:
    order = SampleOrder(61, 8, seed=4, shuffle_chunks=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = sorted(rng.integers(0, 62, size=2).tolist())
        np.testing.assert_array_equal(order.samples(1, a, b), order.samples(1)[a:b])
    whole = np.concatenate([order.samples(e) for e in range(3)])
    np.testing.assert_array_equal(order.stream_samples(40, 150), whole[40:150])


@pytest.mark.parametrize("shuffle", [True, False])
def test_schedule_index_covers_the_window_of_every_position(shuffle: bool) -> None:
    order = SampleOrder(61, 8, seed=2, shuffle=shuffle, shuffle_chunks=3)
    seq = order.stream_samples(0, 2 * 61)
    for pos, sample in enumerate(seq.tolist()):
        i = order.schedule_index(pos)
        ahead = {
            order.scheduled_chunk(k)
            for k in range(i, i + order.window_chunks)
            if k < 2 * order.num_chunks
        }
        assert sample // 8 in ahead
    assert order.schedule_index(61) == order.num_chunks  # epoch 1 starts a new schedule pass


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"shuffle_chunks": 0}, {"chunk_samples": 0}])
def test_bad_arguments_name_the_field(kwargs: dict[str, int]) -> None:
    args: dict[str, Any] = {"num_samples": 10, "chunk_samples": 4, **kwargs}
    with pytest.raises(StreamConfigError, match=next(iter(kwargs))):
        SampleOrder(**args)
