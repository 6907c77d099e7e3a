"""The O(V) reductions on the reduction workers: with two or more torch threads, the head runs per group
of row blocks and the workers reduce the group's blocks at once; the stored arrays equal the one-thread
full-logits path's. The
reductions' reused scratch buffer never leaks one call's values into the next."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import mtkd_cache.precompute.chunk as chunk
import mtkd_cache.precompute.extract as extract
import mtkd_cache.precompute.headblocks as headblocks
from mtkd_cache import RunConfig, run_teacher


def _arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    root = cache / "teachers" / name
    return {str(m.parent.relative_to(root)): zarr.open_array(str(m.parent), mode="r")[:]
            for m in root.rglob("zarr.json") if json.loads(m.read_text())["node_type"] == "array"}


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("group_rows", [10, 20])
def test_blocks_on_the_workers_equal_the_full_logits_on_one_thread(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch,
    two_threads: None, group_rows: int,
) -> None:
    monkeypatch.setitem(extract._BLOCK_ELEMENTS, "cpu", 72 * 5)  # 5 rows per block: many blocks per batch
    monkeypatch.setattr(headblocks, "GROUP_ELEMENTS", 72 * group_rows)  # a few blocks per head call: many groups
    on_pool: list[bool] = []
    real = headblocks._block_results

    def spy(*args: object, **kwargs: object) -> object:
        on_pool.append(args[-1] is not None)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(headblocks, "_block_results", spy)
    blocked = copy_cache(inputs_template, "blocked")
    run_teacher(blocked, RunConfig(teacher="t", model=str(lm_dir), batch_size=4, top_k=8), progress=False)
    assert on_pool and all(on_pool)  # every batch's blocks ran on the workers
    torch.set_num_threads(1)
    monkeypatch.setattr(chunk, "head_split", lambda teacher, batch: None)  # the full-logits path, no workers
    full = copy_cache(inputs_template, "full")
    run_teacher(full, RunConfig(teacher="t", model=str(lm_dir), batch_size=4, top_k=8), progress=False)
    a, b = _arrays(blocked, "t"), _arrays(full, "t")
    assert a.keys() == b.keys() and len(a) >= 2
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_scratch_buffer_carries_nothing_between_calls() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 1, 300, generator=g) * 4  # fills the thread's scratch with other rows first
    small = torch.randn(3, 1, 200, generator=g) * 4
    extract.topk_targets_with_stats(big, 16)
    got = extract.topk_targets_with_stats(small, 16)
    logp = torch.log_softmax(small.double(), dim=-1)
    top = torch.topk(logp, 16, dim=-1)
    order = top.indices.sort(dim=-1)
    assert torch.equal(got[0], order.values)
    np.testing.assert_allclose(got[1].numpy(), top.values.gather(-1, order.indices).numpy(), atol=1e-5)
    tail = 1 - top.values.exp().sum(-1)
    np.testing.assert_allclose(got[2].numpy(), tail.numpy(), atol=1e-6)
    entropy = -(logp.exp() * logp).sum(-1)
    np.testing.assert_allclose(got[3].numpy(), entropy.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[4].numpy(), logp.exp().amax(-1).numpy(), atol=1e-6)
