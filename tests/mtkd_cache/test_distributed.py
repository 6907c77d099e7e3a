"""Sharded precompute: `torchrun --nproc_per_node 2` (gloo, CPU) writes what one process writes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from mtkd_cache import RunConfig, open_cache, run_teacher
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter
from tests.mtkd_cache.conftest import REPO_ROOT


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


def test_ranks_own_disjoint_contiguous_chunk_ranges_covering_the_cache(
    copy_cache: Callable[..., Path], lm_template: Path
) -> None:
    cache = copy_cache(lm_template)
    reader = CacheReader(CacheStore(cache))
    meta = reader.teacher("lm").meta
    writer = TeacherWriter(CacheStore(cache), meta, reader.inputs, create=False)
    # Pretend nothing is committed yet, so every chunk is pending.
    writer.committed = lambda: set()  # type: ignore[method-assign]
    n = reader.num_chunks
    for world in (1, 2, 3, n, n + 2):
        shares = [writer.pending(rank, world) for rank in range(world)]
        assert [c for share in shares for c in share] == list(range(n)), world
        assert all(share == list(range(share[0], share[-1] + 1)) for share in shares if share)
