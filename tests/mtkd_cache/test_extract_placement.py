"""Where `mtkd_cache.precompute.extract` puts its results, in which dtype, and how it blocks rows.

The extractors run on the teacher's device and promise documented dtypes whatever torch's default
dtype is. The meta device stands in for an accelerator (no GPU in the test environment): a buffer
created on the CPU instead of the logits' device cannot take the meta results, so a dropped
``device=`` fails here as it would on a GPU. The row blocks that bound the O(V) loops' memory are
checked exactly, and results across block boundaries against whole-tensor references.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mtkd_cache.precompute.extract import (
    _row_blocks,
    dequantize_int8_rows,
    distribution_stats,
    pool_features,
    quantize_int8_rows,
    sample_targets,
    topk_targets,
    topk_targets_with_stats,
)

META = torch.device("meta")


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Run the test with torch's default dtype set to float64, restoring it afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _placement(tensors: tuple[torch.Tensor, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(t.device.type, t.dtype, tuple(t.shape)) for t in tensors]


def test_topk_results_live_on_the_logits_device() -> None:
    logits = torch.empty(2, 3, 50, device=META)
    assert _placement(topk_targets(logits, 4, temperature=2.0)) == [
        ("meta", torch.int64, (2, 3, 4)), ("meta", torch.float32, (2, 3, 4)), ("meta", torch.float32, (2, 3)),
    ]
    assert _placement(topk_targets_with_stats(logits, 4)) == [
        ("meta", torch.int64, (2, 3, 4)), ("meta", torch.float32, (2, 3, 4)), ("meta", torch.float32, (2, 3)),
        ("meta", torch.float32, (2, 3)), ("meta", torch.float32, (2, 3)),
    ]


def test_stats_and_draws_live_on_the_logits_device() -> None:
    logits = torch.empty(2, 3, 50, device=META)
    assert _placement(distribution_stats(logits, temperature=0.5)) == [
        ("meta", torch.float32, (2, 3)), ("meta", torch.float32, (2, 3)),
    ]
    indices, counts = sample_targets(logits, 5, 1.0, torch.Generator())
    assert _placement((indices, counts)) == [("meta", torch.int64, (2, 3, 5)), ("meta", torch.int32, (2, 3, 5))]


@pytest.mark.usefixtures("float64_default")
def test_documented_dtypes_hold_when_the_default_dtype_is_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 40, generator=generator, dtype=torch.bfloat16)
    indices, logp, tail, entropy, top1 = topk_targets_with_stats(logits, 5)
    assert (indices.dtype, logp.dtype, tail.dtype, entropy.dtype, top1.dtype) == (
        torch.int64, torch.float32, torch.float32, torch.float32, torch.float32)
    assert [t.dtype for t in topk_targets(logits, 5)] == [torch.int64, torch.float32, torch.float32]
    assert [t.dtype for t in distribution_stats(logits)] == [torch.float32, torch.float32]
    drawn, counts = sample_targets(logits, 6, 1.0, generator)
    assert (drawn.dtype, counts.dtype) == (torch.int64, torch.int32)
    pooled = pool_features(torch.randn(2, 3, 4, dtype=torch.float16), torch.tensor([[1, 1, 0], [1, 0, 0]]), "mean")
    assert pooled.dtype == torch.float32
    q, scale = quantize_int8_rows(torch.randn(3, 8, dtype=torch.float16))
    assert (q.dtype, scale.dtype) == (torch.int8, torch.float32)
    assert dequantize_int8_rows(q, scale.to(torch.float16)).dtype == torch.float32


def test_pooling_and_dequantisation_give_float32_even_from_float64() -> None:
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    pooled = pool_features(hidden, torch.tensor([[1, 1, 0], [1, 0, 0]]), "mean")
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[1], hidden[1, 0].float())
    q, scale = quantize_int8_rows(torch.randn(3, 8))
    restored = dequantize_int8_rows(q, scale.to(torch.float64))
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, q.float() * scale.unsqueeze(-1))


def test_draws_from_half_precision_logits_are_the_draws_of_their_float32_copy() -> None:
    # The softmax runs in float32 whatever the logits' dtype, so the same generator state gives
    # the same tokens for bf16 logits and for the float32 tensor holding the same values.
    logits = (torch.randn(2, 4, 300, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    drawn = sample_targets(logits, 64, 1.3, torch.Generator().manual_seed(9))
    reference = sample_targets(logits.float(), 64, 1.3, torch.Generator().manual_seed(9))
    assert torch.equal(drawn[0], reference[0])
    assert torch.equal(drawn[1], reference[1])


@pytest.mark.parametrize(
    ("rows", "vocab", "device", "expected"),
    [
        (10, 1 << 18, "cpu", [(0, 4), (4, 8), (8, 10)]),  # 1 Mi logits per CPU block = 4 rows
        (8, 1 << 18, "cpu", [(0, 4), (4, 8)]),  # an exact multiple leaves no empty block
        (3, 1 << 21, "cpu", [(0, 1), (1, 2), (2, 3)]),  # a row wider than a block: one row each
        (5, 1 << 24, "cuda", [(0, 4), (4, 5)]),  # 64 Mi logits per accelerator block
        (5, 1 << 24, "meta", [(0, 4), (4, 5)]),  # unknown device types get the accelerator size
        (3, 0, "cpu", [(0, 3)]),  # no logits per row: one block
        ((1 << 19) + 1, 1, "cpu", [(0, (1 << 19) + 1)]),  # one logit per row: 1 Mi rows per block
        (0, 100, "cpu", []),
    ],
)
def test_row_blocks_cover_every_row_once_in_blocks_of_the_device_size(
    rows: int, vocab: int, device: str, expected: list[tuple[int, int]]
) -> None:
    blocks = list(_row_blocks(rows, vocab, torch.device(device)))
    assert [(b.start, b.stop) for b in blocks] == expected
    assert all(b.step is None for b in blocks)


def test_results_across_row_blocks_equal_whole_tensor_references() -> None:
    # 5 rows of 2**18 logits: CPU blocks of 4 rows, so the last row is a block of its own.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 1 << 18, generator=generator) * 4
    logp = torch.log_softmax(logits.double(), dim=-1)  # float64 reference
    indices, top_logp, tail, entropy, top1 = topk_targets_with_stats(logits, 3)
    ref_logp, ref_idx = torch.topk(logp, 3, dim=-1)
    ref_idx, order = torch.sort(ref_idx, dim=-1)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(top_logp, torch.gather(ref_logp, -1, order).float(), atol=1e-4, rtol=1e-4)
    rest = logp.exp().scatter(-1, ref_idx, 0.0).sum(dim=-1)
    torch.testing.assert_close(tail, rest.float(), atol=0, rtol=1e-4)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(dim=-1).float(), atol=0, rtol=1e-4)
    torch.testing.assert_close(top1, ref_logp.amax(dim=-1).exp().float(), atol=0, rtol=1e-4)
    stats_entropy, stats_top1 = distribution_stats(logits)
    # the two paths reduce in different orders (extract.py: one exp per block): float32 rounding apart
    torch.testing.assert_close(stats_entropy, entropy, atol=0, rtol=1e-4)
    torch.testing.assert_close(stats_top1, top1, atol=0, rtol=1e-4)
