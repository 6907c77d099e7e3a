"""Sharing a cache with a cross-tokenizer teacher. In an overlay, its tokenization is built in the
overlay (the base is only read), read and verified there, and copied along by `merge`. Through
`export` / `import`, its arrays on their own grid and the tokenization round-trip bit for bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mtkd_cache import RunConfig, open_cache, run_teacher, verify_cache
from mtkd_cache.ops.export import export_cache, import_cache
from mtkd_cache.ops.merge import merge_overlay
from mtkd_train.data import CachedDistillDataset
from tests.mtkd_train.test_cross_tokenizer import prepared_pair


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _batches(cache: Path) -> list[dict]:
    return list(CachedDistillDataset(cache, ["other"], batch_size=4, shuffle=False, epochs=1, prefetch=0))


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if hasattr(a[k], "shape"):
                assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_a_cache_with_a_cross_teacher_round_trips_through_export(tmp_path: Path) -> None:
    _, _, _, other = prepared_pair(tmp_path, 3)
    cache, out, back = tmp_path / "cache", tmp_path / "out", tmp_path / "back"
    run_teacher(cache, RunConfig(teacher="other", model=str(other), top_k=6), progress=False)
    export_cache(cache, out, max_file_bytes=1)
    import_cache(out, back)
    report = verify_cache(back, progress=False)
    assert report.ok, report.problems
    zarr_files = {k: v for k, v in _tree(cache).items() if "/c/" in f"/{k}"}
    assert zarr_files and {k: _tree(back).get(k) for k in zarr_files} == zarr_files  # every chunk, bit for bit
    _assert_same(_batches(back), _batches(cache))


def test_cross_teacher_in_an_overlay_never_writes_the_base(tmp_path: Path) -> None:
    _, _, _, other = prepared_pair(tmp_path, 3)
    base, overlay = tmp_path / "cache", tmp_path / "overlay"
    before = _tree(base)
    run_teacher(overlay, RunConfig(teacher="other", model=str(other), top_k=6), progress=False, inputs=str(base))
    assert _tree(base) == before  # nothing written to the shared cache, not even the tokenization
    assert len([d for d in (overlay / "tokenizations").iterdir() if d.is_dir()]) == 1
    report = verify_cache(overlay, progress=False)
    assert report.ok, report.problems
    from_overlay = _batches(overlay)

    merged = merge_overlay(overlay, base)
    assert merged.teachers == ["other"]
    assert open_cache(base).teacher("other").meta.tokenization is not None
    _assert_same(_batches(base), from_overlay)
