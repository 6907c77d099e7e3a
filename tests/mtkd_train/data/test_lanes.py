"""Lanes: ranks decode disjoint chunks, the global batches stay the same, resume stays exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mtkd_cache import CacheReader
from mtkd_train.data import CachedDistillDataset, SampleOrder

N, CHUNK = 61, 8  # the fixture cache: 8 chunks of 8, the last one partial


@pytest.mark.parametrize(
    ("n", "chunk", "window", "lanes"), [(61, 8, 3, 2), (64, 8, 2, 4), (33, 4, 1, 3), (5, 8, 4, 2)]
)
def test_lanes_keep_every_epoch_a_permutation_and_interleave(
    n: int, chunk: int, window: int, lanes: int
) -> None:
    order = SampleOrder(n, chunk, seed=1, shuffle_chunks=window, lanes=lanes)
    for epoch in range(2):
        seq = order.samples(epoch)
        assert sorted(seq.tolist()) == list(range(n))
        lane_of_pos = order.stream_lanes(epoch * n, (epoch + 1) * n)
        rr = order.round_robin_end(epoch)
        assert (lane_of_pos[:rr] == np.arange(rr) % lanes).all() and (lane_of_pos[rr:] == -1).all()
        for ln in range(lanes):  # a lane's positions hold only that lane's chunks
            lane, _, _ = order.locate(epoch, np.arange(n))
            assert set((seq[lane == ln] // chunk).tolist()) == set(
                order.lane_chunks(epoch, ln).tolist()
            )
    assert sorted(order.schedule_index(p) for p in range(n)) == [
        order.schedule_index(p) for p in range(n)
    ]


def _ranks(
    reader: CacheReader, world: int, state: dict[str, Any] | None = None, **kw: Any
) -> list[CachedDistillDataset]:
    """One stream per rank (no read-ahead, so `stats.decoded` holds only what batches needed)."""
    args: dict[str, Any] = {"batch_size": 4, "seed": 7, "shuffle_chunks": 2, "prefetch": 0, **kw}
    out = []
    for rank in range(world):
        ds = CachedDistillDataset(reader, ["a"], rank=rank, world_size=world, **args)
        if state is not None:
            ds.load_state_dict(state)
        out.append(ds)
    return out


def _take(ds: CachedDistillDataset, steps: int) -> tuple[list[list[int]], set[int]]:
    it = iter(ds)
    batches = [next(it)["sample_ids"].tolist() for _ in range(steps)]
    return batches, set(it.stats.decoded)  # type: ignore[attr-defined]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_decode_disjoint_chunks_that_cover_the_epoch(
    token_reader: CacheReader, world: int
) -> None:
    ranks = _ranks(token_reader, world, batch_size=8 // world)
    order = ranks[0].order
    assert order.lanes == world and ranks[1].own_lanes == range(1, 2)
    steps = order.round_robin_end(0) // 8  # full global batches inside the round-robin part
    got = [_take(ds, steps) for ds in ranks]
    decoded = [d for _, d in got]
    for r in range(world):
        for q in range(r + 1, world):
            assert not decoded[r] & decoded[q], (
                f"ranks {r} and {q} both decoded {decoded[r] & decoded[q]}"
            )
        assert decoded[r] <= set(order.lane_chunks(0, r).tolist())
    samples = [set(sum(b, [])) for b, _ in got]
    assert set().union(*samples) == set(order.samples(0, 0, steps * 8).tolist())
    assert set().union(*decoded) == set(range(order.num_chunks))  # every chunk is read by some rank
    for j in range(steps):  # each global batch is the global order's, split B per rank
        assert all(len(b[j]) == 8 // world for b, _ in got)
        assert set(sum((b[j] for b, _ in got), [])) == set(
            order.samples(0, 8 * j, 8 * j + 8).tolist()
        )


def test_only_the_tail_is_shared_over_a_whole_epoch(token_reader: CacheReader) -> None:
    ranks = _ranks(token_reader, 2, epochs=1)
    order = ranks[0].order
    tail = order.samples(0, order.round_robin_end(0))
    got = []
    for ds in ranks:
        it = iter(ds)
        seen = sum((b["sample_ids"].tolist() for b in it), [])
        got.append((seen, set(it.stats.decoded)))
    assert sorted(got[0][0] + got[1][0]) == list(range(N))
    assert got[0][1] & got[1][1] <= set((tail // CHUNK).tolist())


@pytest.mark.parametrize("resume_world", [1, 2, 3])
def test_resume_on_another_world_size_keeps_the_global_batches(
    token_reader: CacheReader, resume_world: int
) -> None:
    def global_batches(ranks: list[CachedDistillDataset], steps: int) -> list[set[int]]:
        per = [_take(ds, steps)[0] for ds in ranks]
        return [set(sum((p[j] for p in per), [])) for j in range(steps)]

    full = global_batches(_ranks(token_reader, 4, batch_size=2), 20)  # 20 steps of 8: into epoch 2
    first = _ranks(token_reader, 4, batch_size=2)
    for ds in first:
        ds.consumed(7)
    state = first[0].state_dict()
    assert state["lanes"] == 4
    resumed = _ranks(
        token_reader, resume_world, state, batch_size=8 // resume_world if resume_world != 3 else 3
    )
    if resume_world == 3:  # 9 per step: compare the flat streams instead
        per = [_take(ds, 5)[0] for ds in resumed]
        flat = set(sum((p[j] for j in range(5) for p in per), []))
        want = set(
            SampleOrder(N, CHUNK, seed=7, shuffle_chunks=2, lanes=4)
            .stream_samples(56, 56 + 45)
            .tolist()
        )
        assert resumed[0].order.lanes == 4 and resumed[0].own_lanes is None and flat == want
        return
    assert resumed[0].order.lanes == 4 and resumed[0].own_lanes is not None
    assert global_batches(resumed, 13) == full[7:]


def test_states_without_lanes_resume_the_one_lane_order(token_reader: CacheReader) -> None:
    ds = _ranks(token_reader, 2)[0]
    state = {k: v for k, v in ds.state_dict().items() if k != "lanes"}
    ds.load_state_dict(state)
    assert ds.order.lanes == 1 and ds.own_lanes is None
