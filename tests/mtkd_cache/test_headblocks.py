"""The LM head per row block: the stored arrays equal the full-logits path's, and no (B, L, V)
logits tensor is built for a causal LM whose logits are head(last hidden)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_models

import mtkd_cache.precompute.batching as batching
import mtkd_cache.precompute.chunk as chunk
import mtkd_cache.precompute.extract as extract
import mtkd_cache.precompute.headblocks as headblocks
from mtkd_cache import RunConfig, run_teacher
from mtkd_cache.precompute.batching import logits_token_budget
from mtkd_cache.precompute.models import load_teacher


def _arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    root = cache / "teachers" / name
    return {str(m.parent.relative_to(root)): zarr.open_array(str(m.parent), mode="r")[:]
            for m in root.rglob("zarr.json") if json.loads(m.read_text())["node_type"] == "array"}


@pytest.mark.parametrize("kind", [{"top_k": 8, "features": (1, -1)}, {"top_k": None, "samples": 6}])
def test_blocked_head_equals_the_full_logits(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch,
    kind: dict[str, Any],
) -> None:
    monkeypatch.setitem(extract._BLOCK_ELEMENTS, "cpu", 72 * 5)  # 5 rows per block: many blocks per batch
    monkeypatch.setattr(headblocks, "GROUP_ELEMENTS", 72 * 15)  # the head per group of 3 blocks (15 rows)
    rows_seen: list[int] = []
    real_logits = headblocks.HeadSplit.logits

    def spy(self: headblocks.HeadSplit, hidden: torch.Tensor) -> torch.Tensor:
        rows_seen.append(hidden.shape[0])
        return real_logits(self, hidden)

    monkeypatch.setattr(headblocks.HeadSplit, "logits", spy)
    blocked = copy_cache(inputs_template, "blocked")
    run_teacher(blocked, RunConfig(teacher="t", model=str(lm_dir), batch_size=4, **kind), progress=False)
    # the probe's 8 tokens, then groups of up to 3 blocks: one head call per group, never per block nor B·L rows
    # (a last group under 4 rows joins the one before it)
    assert rows_seen and max(rows_seen) < 15 + headblocks.MIN_GROUP_ROWS and any(r > 5 for r in rows_seen[1:])

    monkeypatch.setattr(chunk, "head_split", lambda teacher, batch: None)  # the full-logits path
    full = copy_cache(inputs_template, "full")
    run_teacher(full, RunConfig(teacher="t", model=str(lm_dir), batch_size=4, **kind), progress=False)
    a, b = _arrays(blocked, "t"), _arrays(full, "t")
    assert a.keys() == b.keys() and len(a) >= 2
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_model_with_other_post_processing_keeps_the_full_logits(lm_dir: Path, tmp_path: Path) -> None:
    teacher = load_teacher(str(lm_dir), device=torch.device("cpu"), dtype=torch.float32)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    assert headblocks.head_split(teacher, batch) is not None
    scaled = load_teacher(str(shutil.copytree(lm_dir, tmp_path / "scaled")), device=torch.device("cpu"), dtype=torch.float32)
    forward = scaled.module.forward

    def logit_scale(*args: Any, **kwargs: Any) -> Any:  # like Cohere's logit_scale: not head(hidden)
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    scaled.module.forward = logit_scale  # type: ignore[method-assign]
    assert headblocks.head_split(scaled, batch) is None


def test_the_token_budget_counts_the_vocabulary_of_full_logits() -> None:
    assert logits_token_budget(None, 262_144, full_logits=True, dtype_bytes=2) == 4096  # 2 GiB of bf16
    assert logits_token_budget(1000, 262_144, full_logits=True, dtype_bytes=2) == 1000
    assert logits_token_budget(8192, 262_144, full_logits=True, dtype_bytes=4) == 2048
    assert logits_token_budget(None, 10**9, full_logits=True, dtype_bytes=4) == 1  # a sample still runs alone
    assert logits_token_budget(None, 262_144, full_logits=False, dtype_bytes=2) is None  # head per row block
    assert logits_token_budget(64, 262_144, full_logits=False, dtype_bytes=2) == 64


@pytest.mark.parametrize(("model", "full"), [("factory", True), ("hf", False)])
def test_run_plans_batches_with_the_vocabulary_budget(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch,
    model: str, full: bool,
) -> None:
    width = 64 if model == "factory" else 72  # the factory's head, lm_dir's padded head
    monkeypatch.setattr(batching, "LOGITS_BUDGET_BYTES", 20 * width * 4)  # 20 tokens of fp32 logits
    budgets: list[int | None] = []
    plan = chunk.length_grouped_batches
    monkeypatch.setattr(chunk, "length_grouped_batches", lambda lengths, budget, size: budgets.append(budget)
                        or plan(lengths, budget, size))
    cache = copy_cache(inputs_template)
    name = f"{tiny_models.__name__}:tiny_factory_lm" if model == "factory" else str(lm_dir)
    kwargs = {"vocab_size": 64} if model == "factory" else None
    run_teacher(cache, RunConfig(teacher="t", model=name, top_k=4, max_tokens=64), factory_kwargs=kwargs,
                progress=False)
    assert budgets and set(budgets) == ({20} if full else {64})


def test_each_group_is_reduced_before_the_next_groups_head_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the workers, a group's reductions never share the cores with the next group's head (its GEMM's static
    split would wait for its slowest thread)."""
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    flat = torch.randn(40, 8)
    events: list[str] = []
    monkeypatch.setattr(headblocks, "GROUP_ELEMENTS", 4 * 5 * 50)  # 4 blocks of 5 rows per head call

    class Spy(headblocks.HeadSplit):
        def logits(self, hidden: torch.Tensor) -> torch.Tensor:
            events.append("head")
            return super().logits(hidden)

    def reduce(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], list[torch.Tensor]]:
        time.sleep(0.01)  # slower than a head call: an overlapped head would come first
        events.append("reduced")
        return [], [logits.amax(-1)]

    blocks = [slice(a, a + 5) for a in range(0, 40, 5)]
    with ThreadPoolExecutor(2) as pool:
        got = list(headblocks._block_results(Spy(torch.nn.Identity(), head, None), flat, None, blocks, 50, reduce, pool))
    assert events == ["head", "reduced", "reduced", "reduced", "reduced"] * 2
    assert [rows for rows, *_ in got] == blocks and all(logits is None for _, logits, *_ in got)
    torch.testing.assert_close(torch.cat([out[0] for *_, out in got]), head(flat).amax(-1, keepdim=True))


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a device other than the CPU (as a GPU)
def test_the_cpu_groups_blocks_per_head_call_and_other_devices_take_one_block(device: str) -> None:
    head = torch.nn.Linear(8, 50, bias=False, device=device).requires_grad_(False)
    calls: list[int] = []

    class Spy(headblocks.HeadSplit):
        def logits(self, hidden: torch.Tensor) -> torch.Tensor:
            calls.append(hidden.shape[0])
            return super().logits(hidden)

    blocks = [slice(a, a + 5) for a in range(0, 40, 5)]
    got = list(headblocks._block_results(Spy(torch.nn.Identity(), head, None), torch.zeros(40, 8, device=device), None,
                                         blocks, 50, lambda logits, mask: ([], [logits.sum(-1)]), None))
    assert [rows for rows, *_ in got] == blocks
    assert calls == ([40] if device == "cpu" else [5] * 8)  # 2^27 logits per call on the CPU; a GPU's block is 2^26


def test_a_consumer_that_stops_leaves_no_queued_reduction() -> None:
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    ran: list[int] = []

    def reduce(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], list[torch.Tensor]]:
        time.sleep(0.05)
        ran.append(logits.shape[0])
        return [], [logits.amax(-1)]

    blocks = [slice(a, a + 5) for a in range(0, 40, 5)]  # one group of 8 blocks on one worker
    with ThreadPoolExecutor(1) as pool:
        results = headblocks._block_results(headblocks.HeadSplit(torch.nn.Identity(), head, None), torch.randn(40, 8),
                                            None, blocks, 50, reduce, pool)
        next(results)
        results.close()  # as when the caller raises
    assert 1 <= len(ran) <= 3  # the first, at most the one running and one more; not all 8


def test_the_blocks_go_in_the_fewest_groups_of_equal_size() -> None:
    blocks = [slice(a, min(a + 21, 2048)) for a in range(0, 2048, 21)]  # V = 49,152: 98 blocks of 21 rows
    groups = headblocks._groups(blocks, 65)  # at most 65 blocks per head call
    assert [len(g) for g in groups] == [49, 49] and [b for g in groups for b in g] == blocks
    assert [len(g) for g in headblocks._groups(blocks, 40)] == [33, 33, 32]
    assert [len(g) for g in headblocks._groups(blocks, 98)] == [98] and headblocks._groups(blocks[:1], 0) == [blocks[:1]]


def test_a_trailing_group_under_four_rows_joins_the_previous_one() -> None:
    """The CPU matmul's kernel for 1-3 rows rounds differently from the large one's: no head call that small."""
    blocks = [slice(a, min(a + 21, 85)) for a in range(0, 85, 21)]  # 21-row blocks, then a 1-row block
    groups = headblocks._groups(blocks, 2)  # groups of 2, 2 and the last 1-row block
    assert [g[-1].stop - g[0].start for g in groups] == [42, 43] and groups[-1][-1] == slice(84, 85)
    groups = headblocks._groups(blocks[:-1] + [slice(84, 88)], 2)  # 4 rows: a group of its own
    assert [g[-1].stop - g[0].start for g in groups] == [42, 42, 4]
    assert headblocks._groups(blocks[:1], 16) == [blocks[:1]] and headblocks._groups([slice(0, 2)], 16) == [[slice(0, 2)]]
