"""Overlays: a teacher added to a cache the user may only read, read next to the shared ones, merged.

The shared cache is served read-only by `python -m http.server` on loopback (a real read-only
store); the overlay is a local folder. Nothing is ever written to the shared cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.remote_cache import FACTORY, build, read_arrays

from mtkd_cache import RunConfig, open_cache, prepare_arrays, run_teacher, verify_cache
from mtkd_cache.cli import main
from mtkd_cache.errors import CacheExistsError, CacheMismatchError
from mtkd_cache.format.overlay import OverlayReader
from mtkd_cache.ops.merge import merge_overlay

KW = {"vocab_size": 64, "num_classes": 4}


def _mine(url: str, inputs: str | None, seed: int = 5) -> None:
    run_teacher(url, RunConfig(teacher="mine", model=FACTORY, top_k=2), factory_kwargs={**KW, "seed": seed},
                progress=False, inputs=inputs)


@pytest.fixture
def shared(http_server, tmp_path: Path) -> tuple[Path, str]:  # noqa: ANN001
    local = tmp_path / "shared"
    build(str(local))
    dest = http_server.root / f"ov-{tmp_path.name}"
    shutil.copytree(local, dest)
    return dest, f"{http_server.url}/{dest.name}"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_teacher_in_an_overlay_reads_next_to_the_shared_ones_and_merges(shared, tmp_path: Path) -> None:  # noqa: ANN001
    served, url = shared
    before = _tree(served)
    overlay = tmp_path / "overlay"
    _mine(str(overlay), url)
    assert not (overlay / "inputs").exists() and not (overlay / "manifest.json").exists()  # inputs stay shared
    assert sorted(p.name for p in (overlay / "teachers").iterdir() if p.is_dir()) == ["mine"]
    assert _tree(served) == before
    reader = open_cache(overlay)
    assert isinstance(reader, OverlayReader) and reader.teacher_names == ["fac", "mine"]
    data = reader.read_chunk(0, teachers=["fac", "mine"])
    reference = tmp_path / "reference"  # the same teacher run on a writable copy of the cache
    shutil.copytree(served, reference)
    _mine(str(reference), None)
    want = open_cache(reference).read_chunk(0, teachers=["fac", "mine"])
    for name in ("fac", "mine"):
        np.testing.assert_array_equal(data.targets[name].logp, want.targets[name].logp)
    target = tmp_path / "target"
    shutil.copytree(served, target)
    res = CliRunner().invoke(main, ["merge", str(overlay), str(target)])
    assert res.exit_code == 0 and "verified" in res.output, res.output
    assert verify_cache(target, progress=False).ok
    got = open_cache(target).read_chunk(0, teachers=["mine"]).targets["mine"]
    np.testing.assert_array_equal(got.indices, want.targets["mine"].indices)
    with pytest.raises(CacheExistsError, match="already holds"):
        merge_overlay(overlay, target)


def test_an_overlay_over_other_inputs_is_refused(shared, tmp_path: Path) -> None:  # noqa: ANN001
    served, url = shared
    overlay = tmp_path / "overlay"
    _mine(str(overlay), url)
    rec = json.loads((overlay / "overlay.json").read_text())
    other = tmp_path / "other"
    prepare_arrays(other, {"input_ids": np.ones((20, 6), dtype=np.int64)}, labels=list(np.arange(20) % 4),
                   chunk_samples=8)
    (overlay / "overlay.json").write_text(json.dumps({**rec, "base": str(other)}))
    with pytest.raises(CacheMismatchError, match="dataset fingerprint"):
        open_cache(overlay)
    with pytest.raises(CacheMismatchError, match="merge into the cache the overlay was made for"):
        (overlay / "overlay.json").write_text(json.dumps(rec))
        merge_overlay(overlay, other)


def test_cli_run_with_inputs_writes_an_overlay(shared, tmp_path: Path) -> None:  # noqa: ANN001
    served, url = shared
    overlay = tmp_path / "o"
    res = CliRunner().invoke(main, ["run", str(overlay), "--inputs", url, "--teacher", "mine", "--model", FACTORY,
                                    "--model-kwargs", json.dumps(KW), "--top-k", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((overlay / "overlay.json").read_text())["base"] == url
    assert len(read_arrays(str(served))) == len(read_arrays(str(overlay)))


def test_verify_checks_an_overlays_own_teachers_and_finds_a_flipped_byte(shared, tmp_path: Path) -> None:  # noqa: ANN001
    served, url = shared
    before = _tree(served)
    overlay = tmp_path / "overlay"
    _mine(str(overlay), url)
    report = verify_cache(overlay, progress=False)
    assert report.ok, report.problems
    assert report.teachers_checked == ["mine"]  # the overlay's own; the base's are verified on the base
    shard = next(p for p in sorted((overlay / "teachers" / "mine").rglob("c/*")) if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    damaged = verify_cache(overlay, progress=False)
    assert not damaged.ok and "mine" in damaged.damaged
    assert all("teacher 'mine'" in p for p in damaged.problems)
    assert _tree(served) == before  # verifying an overlay reads its base, never writes it
