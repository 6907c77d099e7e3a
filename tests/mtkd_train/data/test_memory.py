"""InMemoryTargets: one pass of a stream held as a list of ready batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mtkd_cache import CacheReader
from mtkd_train.data import CachedDistillDataset, InMemoryTargets, StreamConfigError


def test_one_pass_is_materialised_in_stream_order(token_reader: CacheReader) -> None:
    ds = CachedDistillDataset(token_reader, ["a"], batch_size=8, seed=3, epochs=1)
    mem = InMemoryTargets.from_stream(ds)
    streamed = [b["sample_ids"] for b in ds]
    assert len(mem) == len(streamed) == 8  # ceil(61 / 8)
    assert all(torch.equal(m["sample_ids"], s) for m, s in zip(mem, streamed, strict=True))
    again = [b["sample_ids"] for b in DataLoader(mem, batch_size=None)]
    assert all(torch.equal(a, s) for a, s in zip(again, streamed, strict=True))
    # per position: input_ids 8 + attention_mask 8 + position_mask 1 + K=8 indices 64 + logp 32
    # + tail 4 bytes; per sample: sample_ids 8 + domains 8 bytes
    expected = sum(
        b["input_ids"].numel() * (8 + 8 + 1 + 64 + 32 + 4) + len(b["sample_ids"]) * 16 for b in mem
    )
    assert mem.nbytes == expected


def test_endless_stream_needs_a_batch_limit(token_reader: CacheReader) -> None:
    ds = CachedDistillDataset(token_reader, ["a"], batch_size=8, seed=3)
    with pytest.raises(StreamConfigError, match="endless"):
        InMemoryTargets.from_stream(ds)
    assert len(InMemoryTargets.from_stream(ds, max_batches=20)) == 20  # crosses into epoch 2
