"""Tests for mtkd_cache.precompute.batching: length-grouped batch plans and right padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd_cache.precompute.batching import length_grouped_batches, pad_batch


def _padded_tokens(batches: list[list[int]], lengths: np.ndarray) -> int:
    return sum(len(batch) * int(lengths[batch].max()) for batch in batches)


def test_batches_cover_every_index_once_within_limits() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=257)
    batches = length_grouped_batches(lengths.tolist(), max_tokens=400, batch_size=8)

    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(257))
    assert all(1 <= len(batch) <= 8 for batch in batches)
    assert all(len(batch) * lengths[batch].max() <= 400 for batch in batches)


def test_grouping_reduces_padding_versus_dataset_order() -> None:
    lengths = np.random.default_rng(1).integers(1, 200, size=512)
    grouped = length_grouped_batches(lengths.tolist(), max_tokens=None, batch_size=16)
    naive = [list(range(start, start + 16)) for start in range(0, 512, 16)]

    real = int(lengths.sum())
    grouped_waste = _padded_tokens(grouped, lengths) - real
    naive_waste = _padded_tokens(naive, lengths) - real
    assert len(grouped) == len(naive)
    assert grouped_waste < naive_waste / 10


def test_plan_is_deterministic_longest_first_with_index_ties() -> None:
    lengths = [3, 7, 3, 7, 5, 3]
    plan = length_grouped_batches(lengths, max_tokens=None, batch_size=2)
    assert plan == [[1, 3], [4, 0], [2, 5]]
    assert length_grouped_batches(lengths, None, 2) == plan


def test_sample_over_the_token_budget_gets_its_own_batch() -> None:
    plan = length_grouped_batches([10, 500, 10, 30], max_tokens=60, batch_size=8)
    assert plan == [[1], [3, 0], [2]]


@pytest.mark.parametrize(
    ("max_tokens", "batch_size", "match"),
    [(None, 0, "batch_size"), (0, 4, "max_tokens")],
)
def test_invalid_plan_arguments_raise(max_tokens: int | None, batch_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        length_grouped_batches([1, 2], max_tokens, batch_size)


def test_pad_batch_right_pads_with_mask() -> None:
    batch = pad_batch([np.array([5, 6, 7]), np.array([8], dtype=np.int32)], pad_id=0)

    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_pad_batch_rejects_empty_sequences() -> None:
    with pytest.raises(ValueError, match="sequence 1"):
        pad_batch([np.array([1]), np.array([], dtype=np.int64)], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_id=0)
