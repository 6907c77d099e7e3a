"""CachedDistillDataset: coverage, content, worker/rank independence, exact resume, bounded memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtkd_cache import CacheReader
from mtkd_train.data import (
    CachedDistillDataset,
    SampleOrder,
    StreamConfigError,
    StreamStateError,
    TeacherNotFoundError,
)

N = 61  # token samples in the fixture cache: 8 chunks of 8, the last one partial


def _stream(reader: CacheReader, **kw: Any) -> CachedDistillDataset:
    args: dict[str, Any] = {
        "teachers": ["a"],
        "batch_size": 4,
        "seed": 7,
        "shuffle_chunks": 3,
        "epochs": 1,
        "lanes": 1,  # ranks slice batches contiguously; lanes are tested in test_lanes.py
    }
    return CachedDistillDataset(reader, **{**args, **kw})


def _rank_batches(
    reader: CacheReader, world: int, workers: int, state: dict[str, Any] | None = None, **kw: Any
) -> list[list[list[int]]]:
    """Sample ids of every batch of every rank: out[rank][batch] = ids."""
    out = []
    for rank in range(world):
        ds = _stream(reader, rank=rank, world_size=world, **kw)
        if state is not None:
            ds.load_state_dict(state)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        out.append([b["sample_ids"].tolist() for b in loader])
    return out


def _global_sequence(per_rank: list[list[list[int]]]) -> list[int]:
    """Global batch j is rank 0's j-th batch, then rank 1's, ...; ranks may run out at the end."""
    seq: list[int] = []
    for j in range(max(len(r) for r in per_rank)):
        for rank in per_rank:
            seq += rank[j] if j < len(rank) else []
    return seq


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_each_sample_once_per_epoch_disjoint_over_ranks(
    token_reader: CacheReader, world: int, workers: int
) -> None:
    per_rank = _rank_batches(token_reader, world, workers)
    ids = [set(sum(r, [])) for r in per_rank]
    assert sum(len(s) for s in ids) == N and set().union(*ids) == set(range(N))
    for rank in per_rank:  # full batches except the final split one
        assert all(len(b) == 4 for b in rank[:-1])
    expected = SampleOrder(N, 8, seed=7, shuffle_chunks=3).samples(0).tolist()
    assert _global_sequence(per_rank) == expected  # same order for any number of workers and ranks


def test_drop_last_drops_only_the_final_partial_global_batch(token_reader: CacheReader) -> None:
    per_rank = _rank_batches(token_reader, 2, 0, drop_last=True)
    assert [len(r) for r in per_rank] == [7, 7]  # 61 // 8 global batches
    assert (
        _global_sequence(per_rank)
        == SampleOrder(N, 8, seed=7, shuffle_chunks=3).samples(0)[:56].tolist()
    )


def test_epochs_follow_each_other_with_new_permutations(token_reader: CacheReader) -> None:
    batches = [b["sample_ids"].tolist() for b in _stream(token_reader, epochs=2, batch_size=5)]
    seq: list[int] = sum(batches, [])
    assert all(len(b) == 5 for b in batches[:-1])  # a batch spans the epoch boundary: stays full
    assert sorted(seq[:N]) == list(range(N)) and sorted(seq[N:]) == list(range(N))
    assert seq[:N] != seq[N:]


def _check_token_batch(reader: CacheReader, batch: dict[str, Any]) -> None:
    domains = reader.samples.column("domain").to_pylist()
    for row, sid in enumerate(batch["sample_ids"].tolist()):
        ref = reader.sample(sid, ["a", "s", "cls"])
        n = ref["num_positions"]
        assert batch["input_ids"][row, :n].tolist() == ref["token_ids"].tolist()
        assert (
            batch["position_mask"][row].sum().item() == n
            and not batch["position_mask"][row, n:].any()
        )
        assert (batch["input_ids"][row, n:] == 0).all()  # the tokenizer's pad id
        assert reader.inputs.domains[batch["domains"][row]] == domains[sid]  # type: ignore[index]
        a, s, c = ref["targets"]["a"], ref["targets"]["s"], ref["targets"]["cls"]
        ta, ts, tc = batch["targets"]["a"], batch["targets"]["s"], batch["targets"]["cls"]
        np.testing.assert_array_equal(ta["indices"][row, :n].numpy(), a.indices)
        np.testing.assert_array_equal(ta["logp"][row, :n].numpy(), a.logp)
        np.testing.assert_array_equal(ta["tail"][row, :n].numpy(), a.tail)
        assert torch.isinf(ta["logp"][row, n:]).all() and (ta["tail"][row, n:] == 1).all()
        np.testing.assert_array_equal(ts["indices"][row, :n].numpy(), s.indices)
        np.testing.assert_array_equal(ts["counts"][row, :n].numpy(), s.counts)
        assert (ts["counts"][row, n:] == 0).all()
        np.testing.assert_array_equal(tc["logp"][row].numpy(), c.logp)  # sample grid: T = 1


def test_batches_hold_what_the_reader_holds(token_reader: CacheReader) -> None:
    ds = _stream(token_reader, teachers=["a", "s"], world_size=2, rank=1, batch_size=3)
    plain = _stream(token_reader, teachers=["cls"], world_size=2, rank=1, batch_size=3)
    for batch, other in zip(ds, plain, strict=True):
        assert torch.equal(batch["sample_ids"], other["sample_ids"])
        assert batch["input_ids"].shape[1] == int(batch["position_mask"].sum(1).max())
        _check_token_batch(
            token_reader, {**batch, "targets": {**batch["targets"], **other["targets"]}}
        )


def test_features_match_the_cached_rows(token_reader: CacheReader) -> None:
    ds = _stream(
        token_reader, teachers=["a", "b"], features={"a": [1], "b": [-1]}, pad_to_max_length=True
    )
    batch = next(iter(ds))
    assert batch["input_ids"].shape == (4, 16)
    for row, sid in enumerate(batch["sample_ids"].tolist()):
        chunk = token_reader.read_chunk(sid // 8, features={"a": [1], "b": [-1]})
        i = sid - 8 * (sid // 8)
        o, n = int(chunk.offsets[i]), int(chunk.lengths[i])
        per_pos = batch["features"]["a"]["layer_1"]  # (B, L, D)
        np.testing.assert_array_equal(
            per_pos[row, :n].numpy(), chunk.features["a"]["layer_1"][o : o + n]
        )
        assert (per_pos[row, n:] == 0).all()
        np.testing.assert_array_equal(
            batch["features"]["b"]["layer_m1"][row].numpy(), chunk.features["b"]["layer_m1"][i]
        )


def test_array_inputs_labels_and_sample_grid(array_reader: CacheReader) -> None:
    ds = CachedDistillDataset(
        array_reader, ["vit"], features={"vit": [-1]}, batch_size=5, epochs=1, seed=1
    )
    seen, labels = [], []
    for batch in ds:
        assert "input_ids" not in batch and batch["targets"]["vit"]["indices"].shape[1:] == (1, 3)
        assert batch["features"]["vit"]["layer_m1"].shape[1:] == (32,)
        for row, sid in enumerate(batch["sample_ids"].tolist()):
            ref = array_reader.sample(sid, ["vit"])
            np.testing.assert_array_equal(batch["pixel_values"][row].numpy(), ref["pixel_values"])
            assert batch["labels"][row].item() == ref["label"]
            np.testing.assert_array_equal(
                batch["targets"]["vit"]["logp"][row, 0].numpy(), ref["targets"]["vit"].logp[0]
            )
            seen.append(sid)
        labels += batch["labels"].tolist()
    assert sorted(seen) == list(range(29))
    assert labels.count(-100) == 5  # samples 0, 7, 14, 21, 28 were prepared unlabelled


@pytest.mark.parametrize(
    ("world", "workers", "batch_size"), [(2, 2, 3), (1, 0, 3), (3, 2, 4), (1, 2, 5)]
)
def test_mid_epoch_resume_continues_the_same_sequence(
    token_reader: CacheReader, world: int, workers: int, batch_size: int
) -> None:
    # The interrupted run: 2 ranks x 3 samples, 2 workers prefetching ahead of the trainer.
    ds = _stream(token_reader, teachers=[], rank=0, world_size=2, batch_size=3, epochs=2)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    for _ in range(13):  # the 11th..13th global batches cross into epoch 1
        next(it)
        ds.consumed(1)
    state = ds.state_dict()
    del it
    assert (state["epoch"], state["samples_consumed"]) == (1, 13 * 6 - N)
    full = SampleOrder(N, 8, seed=7, shuffle_chunks=3).stream_samples(0, 2 * N).tolist()
    resumed = _rank_batches(
        token_reader, world, workers, state, teachers=[], batch_size=batch_size, epochs=2
    )
    assert _global_sequence(resumed) == full[13 * 6 :]


def test_state_of_another_order_is_refused(token_reader: CacheReader) -> None:
    state = _stream(token_reader).state_dict()
    with pytest.raises(StreamStateError, match=r"seed=7.*this stream has 8"):
        _stream(token_reader, seed=8).load_state_dict(state)
    with pytest.raises(StreamStateError, match="shuffle_chunks"):
        _stream(token_reader, shuffle_chunks=2).load_state_dict(state)
    with pytest.raises(StreamStateError, match="samples_consumed"):
        _stream(token_reader).load_state_dict({**state, "samples_consumed": -3})


def test_consumed_stops_at_the_end_of_a_finite_stream(token_reader: CacheReader) -> None:
    ds = _stream(token_reader, world_size=2, rank=0)
    assert ds.consumed(7).samples_consumed == 56
    assert ds.consumed(5).to_dict() == {"epoch": 1, "samples_consumed": 0}
    assert list(ds) == []


@pytest.mark.parametrize(("cache_chunks", "prefetch"), [(1, 0), (2, 1), (None, 2)])
def test_decoded_chunks_stay_within_the_bound(
    token_reader: CacheReader, cache_chunks: int | None, prefetch: int
) -> None:
    ds = _stream(
        token_reader,
        teachers=["a", "s"],
        cache_chunks=cache_chunks,
        prefetch=prefetch,
        batch_size=3,
    )
    stream = iter(ds)
    ids = []
    for batch in stream:
        assert len(stream.cache.cached) <= ds.cache_chunks
        ids += batch["sample_ids"].tolist()
    assert stream.stats.peak_cached <= ds.cache_chunks and stream.stats.peak_in_flight <= prefetch
    assert ids == SampleOrder(N, 8, seed=7, shuffle_chunks=3).samples(0).tolist()
    if cache_chunks is None:  # one shuffle window fits: every chunk is decoded exactly once
        assert stream.stats.reads == 8
    else:
        assert stream.stats.reads > 8


def test_bad_arguments_are_refused(token_reader: CacheReader) -> None:
    with pytest.raises(TeacherNotFoundError, match="'nope'"):
        _stream(token_reader, teachers=["nope"])
    with pytest.raises(StreamConfigError, match="rank=2, world_size=2"):
        _stream(token_reader, rank=2, world_size=2)
    with pytest.raises(StreamConfigError, match="batch_size must be >= 1"):
        _stream(token_reader, batch_size=0)
