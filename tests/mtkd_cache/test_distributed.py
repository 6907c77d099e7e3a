"""Sharded precompute: `torchrun --nproc_per_node 2` (gloo, CPU) writes what one process writes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
from mtkd_cache.precompute.distributed import DistInfo, share_of
from tests.mtkd_cache.conftest import REPO_ROOT
from tests.mtkd_cache.test_run_faults import fail_at_chunk

FAIL_TARGET = Path(__file__).with_name("_fail_target.py")


def teacher_arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    root = cache / "teachers" / name
    return {
        str(m.parent.relative_to(root)): zarr.open_array(str(m.parent), mode="r")[:]
        for m in root.rglob("zarr.json")
        if json.loads(m.read_text())["node_type"] == "array"
    }


def test_torchrun_two_processes_equal_one_process_array_for_array(
    copy_cache: Callable[..., Path],
    inputs_template: Path,
    lm_dir: Path,
    subprocess_env: dict[str, str],
    venv_bin: Path,
) -> None:
    single = copy_cache(inputs_template, "single")
    sharded = copy_cache(inputs_template, "sharded")
    options = ["--teacher", "lm", "--top-k", "8", "--features", "0,-1", "--device", "cpu"]
    options += ["--model", str(lm_dir)]
    cmd = [str(venv_bin / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mtkd_cache.cli"]
    cmd += ["run", str(sharded), *options]
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # the 1-process run, computed while torchrun starts its workers
        run_teacher(
            single,
            RunConfig(teacher="lm", model=str(lm_dir), top_k=8, features=(0, -1), device="cpu"),
            progress=False,
        )
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]

    a, b = teacher_arrays(single, "lm"), teacher_arrays(sharded, "lm")
    assert (
        sorted(a)
        == sorted(b)
        == sorted(["indices", "values", "tail", "features/layer_0", "features/layer_m1"])
    )
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert pq.read_table(single / "teachers/lm/chunks.parquet").equals(
        pq.read_table(sharded / "teachers/lm/chunks.parquet")
    )
    one, two = open_cache(single).teacher("lm").meta, open_cache(sharded).teacher("lm").meta
    assert one.settings() == two.settings()
    assert one.stats["positions"] == two.stats["positions"]
    assert np.isclose(one.stats["mean_entropy"], two.stats["mean_entropy"], rtol=1e-9)


def test_ranks_take_interleaved_shares_of_the_broadcast_todo_list() -> None:
    todo = [3, 4, 7, 8, 9, 12, 15]
    for world in (1, 2, 3, len(todo), len(todo) + 2):
        shares = [share_of(todo, DistInfo(rank, world, rank, False)) for rank in range(world)]
        assert sorted(c for share in shares for c in share) == todo, world
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, "work is balanced to one chunk"


def torchrun(nproc: int, args: list[str], env: dict[str, str], venv_bin: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(venv_bin / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(FAIL_TARGET), *args]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def commit_times(cache: Path) -> dict[int, float]:
    return {int(p.stem): json.loads(p.read_text())["time"] for p in (cache / "teachers/lm/_commits").glob("*.json")}


@pytest.mark.slow
def test_resume_with_world_size_1_then_2_then_3_equals_one_uninterrupted_run(
    tmp_path: Path, corpus: Path, lm_dir: Path, subprocess_env: dict[str, str], venv_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each stage crashes at a chunk (1 process, then 2 under torchrun/gloo); the 3-rank run finishes."""
    reference, cache = tmp_path / "reference", tmp_path / "cache"
    for c in (reference, cache):
        prepare(c, corpus, tokenizer=lm_dir, max_length=16, chunk_samples=2, progress=False)
    cfg = RunConfig(teacher="lm", model=str(lm_dir), top_k=8, features=(-1,), device="cpu")
    run_teacher(reference, cfg, progress=False)
    n = open_cache(cache).num_chunks
    fail_at_chunk(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="chunk 4"):
        run_teacher(cache, cfg, progress=False)
    assert set(commit_times(cache)) == {0, 1, 2, 3}
    args = ["run", str(cache), "--teacher", "lm", "--model", str(lm_dir), "--top-k", "8", "--features", "-1",
            "--device", "cpu"]
    two = torchrun(2, args, {**subprocess_env, "MTKD_TEST_FAIL_CHUNKS": str(n - 4)}, venv_bin)
    assert two.returncode != 0 and f"simulated crash in chunk {n - 4}" in two.stderr, two.stderr[-3000:]
    after_two = commit_times(cache)
    # todo = [4, ..., n-1]: rank 0 takes 4, 6, ... and reaches n-4 only after committing those before it.
    assert set(range(4, n - 4, 2)) <= set(after_two) and n - 4 not in after_two
    assert set(after_two) & set(range(5, n, 2)), "rank 1 committed its share too"
    three = torchrun(3, args, subprocess_env, venv_bin)
    assert three.returncode == 0, three.stderr[-3000:]
    final = commit_times(cache)
    assert {c: final[c] for c in after_two} == after_two, "a committed chunk was recomputed"
    a, b = teacher_arrays(reference, "lm"), teacher_arrays(cache, "lm")
    assert sorted(a) == sorted(b) == ["features/layer_m1", "indices", "tail", "values"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    one, resumed = open_cache(reference).teacher("lm").meta, open_cache(cache).teacher("lm").meta
    assert one.settings() == resumed.settings() and one.stats["positions"] == resumed.stats["positions"]
