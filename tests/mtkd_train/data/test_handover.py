"""`_handover`: a worker's batch crosses as one buffer and arrives as the same dict, bit for bit."""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtkd_cache import CacheReader
from mtkd_train.data import CachedDistillDataset
from mtkd_train.data._handover import Handover


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for v in tree.values() for t in _leaves(v)] if isinstance(tree, dict) else []


def _assert_equal(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    else:
        assert a == b


def test_every_dtype_shape_and_nesting_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    batch = {
        "ids": torch.randint(0, 9, (3, 5), generator=g),
        "mask": torch.rand(3, 5, generator=g) > 0.5,
        "targets": {"t": {"logp": torch.randn(3, 5, 7, generator=g), "counts": torch.randint(0, 4, (3, 5, 2),
                                                                                           dtype=torch.int32)}},
        "half": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "odd": torch.ones(3, dtype=torch.uint8),  # 3 bytes: the next tensor must still be aligned
        "expanded": torch.arange(4.0).view(1, 4).expand(3, 4),  # not contiguous
        "empty": torch.zeros(4, 0),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "note": "kept as it is",
    }
    again = pickle.loads(pickle.dumps(Handover(batch)))
    expected = {**batch, "expanded": batch["expanded"].contiguous()}
    _assert_equal(again, expected)
    storages = {t.untyped_storage().data_ptr() for t in _leaves(again) if t.numel()}
    assert len(storages) == 1  # one buffer crossed


def test_a_worker_hands_over_the_batches_the_stream_makes(token_reader: CacheReader) -> None:
    ds = CachedDistillDataset(token_reader, ["a", "b", "s"], features={"a": [1]}, batch_size=3, seed=1, epochs=1)
    here = list(iter(ds))
    there = list(DataLoader(ds, batch_size=None, num_workers=1))
    assert len(here) == len(there) > 1
    for a, b in zip(here, there, strict=True):
        assert not isinstance(b, Handover)
        _assert_equal(a, b)
        assert len({t.untyped_storage().data_ptr() for t in _leaves(b) if t.numel()}) == 1
