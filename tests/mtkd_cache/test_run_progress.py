"""`run`'s progress bar moves per batch, not per chunk: on a slow machine a chunk takes minutes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mtkd_cache.precompute.run as run_module
from mtkd_cache import RunConfig, open_cache, run_teacher


class _Bar:
    made: list[_Bar] = []

    def __init__(self, total: int = 0, **_: Any) -> None:
        self.total, self.updates = total, []
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_the_bar_moves_after_every_batch(copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(inputs_template)
    monkeypatch.setattr(run_module, "tqdm", _Bar)
    _Bar.made.clear()
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=4, batch_size=2), progress=True)
    bar = next(b for b in _Bar.made if b.updates)
    reader = open_cache(cache)
    assert sum(bar.updates) == bar.total == reader.inputs.num_positions  # every position once
    assert len(bar.updates) > reader.num_chunks  # several moves per chunk: one per batch
