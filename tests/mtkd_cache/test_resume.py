"""Resuming a teacher run: after a kill or an error only uncommitted chunks are recomputed, and the
result equals an uninterrupted run's exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import mtkd_cache.precompute.run
from mtkd_cache import (
    CacheExistsError,
    CacheIncompleteError,
    RunConfig,
    open_cache,
    prepare,
    run_teacher,
    verify_cache,
)
from mtkd_cache.cli import main

KILL_TARGET = Path(__file__).with_name("_kill_target.py")


def teacher_arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    """Every zarr array of a teacher group, decoded, by path inside the group."""
    root = cache / "teachers" / name
    out = {}
    for meta in root.rglob("zarr.json"):
        if json.loads(meta.read_text())["node_type"] == "array":
            out[str(meta.parent.relative_to(root))] = zarr.open_array(str(meta.parent), mode="r")[:]
    assert out, f"no arrays under {root}"
    return out


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def markers(cache: Path, name: str) -> dict[int, tuple[int, float]]:
    """chunk -> (mtime_ns, 'time' field) of each commit marker."""
    out = {}
    for path in (cache / "teachers" / name / "_commits").glob("*.json"):
        out[int(path.stem)] = (path.stat().st_mtime_ns, json.loads(path.read_text())["time"])
    return out


def shard_mtimes(cache: Path, name: str, chunks: set[int]) -> dict[str, int]:
    """mtime_ns of every shard object (``<array>/c/<chunk>[/0]``) of the given chunks."""
    out = {}
    for path in (cache / "teachers" / name).rglob("*"):
        parts = path.relative_to(cache).parts
        if path.is_file() and "c" in parts and int(parts[parts.index("c") + 1]) in chunks:
            out[str(path)] = path.stat().st_mtime_ns
    return out


@pytest.fixture
def many_chunks(tmp_path: Path, corpus: Path, lm_dir: Path) -> Path:
    """Inputs in chunks of 2 samples (~25 chunks), so a kill lands with work before and after it."""
    cache = tmp_path / "cache"
    prepare(cache, corpus, tokenizer=lm_dir, max_length=16, chunk_samples=2, progress=False)
    return cache


def test_sigkill_mid_run_then_resume_recomputes_only_uncommitted_chunks(
    many_chunks: Path, tmp_path: Path, lm_dir: Path, subprocess_env: dict[str, str]
) -> None:
    reference = Path(shutil.copytree(many_chunks, tmp_path / "reference"))
    options = ["--teacher", "lm", "--top-k", "8", "--features", "-1", "--device", "cpu"]
    args = ["run", str(many_chunks), *options, "--model", str(lm_dir)]
    num_chunks = open_cache(many_chunks).num_chunks
    commits = many_chunks / "teachers" / "lm" / "_commits"

    proc = subprocess.Popen(
        [sys.executable, str(KILL_TARGET), "0.2", *args],
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The uninterrupted reference run, computed while the child starts up.
        run_teacher(
            reference,
            RunConfig(teacher="lm", model=str(lm_dir), top_k=8, features=(-1,)),
            progress=False,
        )
        deadline = time.monotonic() + 120
        while len(list(commits.glob("*.json"))) < 2:
            assert proc.poll() is None, (
                f"run ended before the kill: {proc.communicate()[1].decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no chunk was committed within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    before = markers(many_chunks, "lm")
    done = set(before)
    assert 2 <= len(done) < num_chunks, "the kill must leave chunks both committed and uncommitted"
    shards_before = shard_mtimes(many_chunks, "lm", done)
    assert shards_before, "committed chunks have shard files"
    # A reader sees the killed teacher as incomplete.
    reader = open_cache(many_chunks)
    assert "lm" not in reader.teacher_names and "lm" in reader.incomplete_teachers()
    with pytest.raises(CacheIncompleteError, match="'lm' is incomplete"):
        reader.teacher("lm")
    assert any(
        "'lm' is incomplete" in p for p in verify_cache(many_chunks, progress=False).problems
    )

    # The same command again, without the slow-down (in this process, to save a start-up).
    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output

    after = markers(many_chunks, "lm")
    assert set(after) == set(range(num_chunks))
    assert {c: after[c] for c in done} == before, "a chunk committed before the kill was recomputed"
    assert shard_mtimes(many_chunks, "lm", done) == shards_before
    assert_same_arrays(teacher_arrays(many_chunks, "lm"), teacher_arrays(reference, "lm"))
    assert (
        open_cache(many_chunks).teacher("lm").meta.stats["positions"]
        == open_cache(many_chunks).inputs.num_positions
    )
    assert verify_cache(many_chunks, progress=False).ok


def test_run_that_failed_mid_way_resumes_where_it_stopped(
    many_chunks: Path, tmp_path: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = Path(shutil.copytree(many_chunks, tmp_path / "reference"))
    cfg = RunConfig(teacher="lm", model=str(lm_dir), top_k=8, samples=None)
    run_teacher(reference, cfg, progress=False)
    real_run_chunk = mtkd_cache.precompute.run.run_chunk

    def failing(*args: Any, **kwargs: Any) -> Any:
        if args[3] == 5:  # (data, teacher, meta, chunk, ...)
            raise RuntimeError("simulated crash in chunk 5")
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", failing)
    with pytest.raises(RuntimeError, match="chunk 5"):
        run_teacher(many_chunks, cfg, progress=False)
    before = markers(many_chunks, "lm")
    assert set(before) == set(range(5))
    assert "lm" in open_cache(many_chunks).incomplete_teachers()

    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[3])
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", counting)
    run_teacher(many_chunks, cfg, progress=False)
    num_chunks = open_cache(many_chunks).num_chunks
    assert calls == list(range(5, num_chunks)), "only the uncommitted chunks are computed again"
    assert {c: markers(many_chunks, "lm")[c] for c in before} == before
    assert_same_arrays(teacher_arrays(many_chunks, "lm"), teacher_arrays(reference, "lm"))


def test_rerun_of_a_complete_teacher_changes_nothing(
    copy_cache: Callable[..., Path],
    lm_template: Path,
    lm_dir: Path,
    snapshot: Callable[[Path], dict[str, str]],
) -> None:
    cache = copy_cache(lm_template)
    before = snapshot(cache)
    meta = run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False)
    assert snapshot(cache) == before
    assert meta == open_cache(cache).teacher("lm").meta


def test_half_done_run_with_other_settings_is_refused(
    many_chunks: Path,
    lm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    snapshot: Callable[[Path], dict[str, str]],
) -> None:
    real_run_chunk = mtkd_cache.precompute.run.run_chunk

    def failing(*args: Any, **kwargs: Any) -> Any:
        if args[3] == 2:
            raise RuntimeError("simulated crash")
        return real_run_chunk(*args, **kwargs)

    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", failing)
    with pytest.raises(RuntimeError):
        run_teacher(
            many_chunks, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False
        )
    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", real_run_chunk)
    before = snapshot(many_chunks)
    with pytest.raises(CacheExistsError, match=r"'lm'.*target.*--overwrite"):
        run_teacher(
            many_chunks, RunConfig(teacher="lm", model=str(lm_dir), top_k=4), progress=False
        )
    assert snapshot(many_chunks) == before
