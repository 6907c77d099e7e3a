"""`finish` reads the commit markers in parallel: the same chunks.parquet and stats as one by one,
and a missing, damaged or stale marker is still caught, naming it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import mtkd_cache.format.targets as targets
from mtkd_cache import CacheFormatError, CacheIncompleteError, CacheMismatchError, open_cache
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter, marker_key, read_markers


def _writer(cache: Path) -> TeacherWriter:
    reader = open_cache(cache)
    return TeacherWriter(CacheStore(cache), reader.teacher("lm").meta, reader.inputs, create=False)


def _finish(cache: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], dict]:
    monkeypatch.setattr(targets, "MARKER_READERS", workers)
    meta = _writer(cache).finish()
    return pq.read_table(cache / "teachers/lm/chunks.parquet").to_pylist(), meta.stats.to_dict()  # type: ignore[union-attr]


def test_parallel_markers_give_what_one_by_one_gives(
    copy_cache: Callable[..., Path], lm_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = copy_cache(lm_template)
    store, n = CacheStore(cache), open_cache(cache).num_chunks
    keys = [marker_key("lm", c) for c in range(n)]
    assert n > 2 and read_markers(store, keys, workers=8) == [store.read_json(k) for k in keys]
    assert [m["chunk"] for m in read_markers(store, keys, workers=8)] == list(range(n))  # in order
    one = _finish(cache, 1, monkeypatch)
    many = _finish(cache, 8, monkeypatch)
    assert many == one and one[0]


@pytest.mark.parametrize("damage", ["missing", "garbage", "stale"])
def test_a_bad_marker_is_still_caught(
    copy_cache: Callable[..., Path], lm_template: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cache = copy_cache(lm_template)
    monkeypatch.setattr(targets, "MARKER_READERS", 8)
    marker = cache / marker_key("lm", 2)
    if damage == "missing":
        marker.unlink()
        error: type[Exception] = CacheIncompleteError
    elif damage == "garbage":
        marker.write_text('{"chunk": 2, "rows"')
        error = CacheFormatError
    else:
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "settings_sha256": "0" * 64}))
        error = CacheMismatchError
    with pytest.raises(error, match=r"00000002\.json|chunks \[2\]"):
        _writer(cache).finish()
