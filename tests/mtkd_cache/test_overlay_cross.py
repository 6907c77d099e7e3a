"""A cross-tokenizer teacher in an overlay: its tokenization is built in the overlay (the base is
only read), read from there, verified there, and copied along by `merge`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mtkd_cache import RunConfig, open_cache, run_teacher, verify_cache
from mtkd_cache.ops.merge import merge_overlay
from mtkd_train.data import CachedDistillDataset
from tests.mtkd_train.test_cross_tokenizer import prepared_pair


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cross_teacher_in_an_overlay_never_writes_the_base(tmp_path: Path) -> None:
    _, _, _, other = prepared_pair(tmp_path, 3)
    base, overlay = tmp_path / "cache", tmp_path / "overlay"
    before = _tree(base)
    run_teacher(overlay, RunConfig(teacher="other", model=str(other), top_k=6), progress=False, inputs=str(base))
    assert _tree(base) == before  # nothing written to the shared cache, not even the tokenization
    assert len([d for d in (overlay / "tokenizations").iterdir() if d.is_dir()]) == 1
    report = verify_cache(overlay, progress=False)
    assert report.ok, report.problems
    from_overlay = list(CachedDistillDataset(overlay, ["other"], batch_size=4, shuffle=False, epochs=1, prefetch=0))
    assert from_overlay and all(b["present"].any() for b in from_overlay if "present" in b)

    merged = merge_overlay(overlay, base)
    assert merged.teachers == ["other"]
    assert open_cache(base).teacher("other").meta.tokenization is not None
    after = list(CachedDistillDataset(base, ["other"], batch_size=4, shuffle=False, epochs=1, prefetch=0))
    assert len(after) == len(from_overlay)
    for a, b in zip(after, from_overlay):
        assert a.keys() == b.keys()
        for k in a:
            if hasattr(a[k], "shape"):
                assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
