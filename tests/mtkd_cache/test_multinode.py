"""Multi-node torchrun on loopback: 2 "nodes" of 1 process each, c10d rendezvous at 127.0.0.1:PORT.

Each node is its own torchrun process (as on two machines); they meet at the rendezvous endpoint,
share the cache folder (as nodes share a file system or an object store) and must write what one
process writes, array for array.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from services import free_port

from mtkd_cache import RunConfig, run_teacher
from tests.mtkd_cache.conftest import REPO_ROOT
from tests.mtkd_cache.test_distributed import teacher_arrays


@pytest.mark.slow  # two torchrun launchers + two workers: ~1 min on 2 shared cores
def test_two_nodes_with_c10d_rendezvous_on_loopback_equal_one_process(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, subprocess_env: dict[str, str],
    venv_bin: Path,
) -> None:
    single, sharded = copy_cache(inputs_template, "single"), copy_cache(inputs_template, "nodes")
    port = free_port()
    options = ["--teacher", "lm", "--top-k", "8", "--device", "cpu", "--model", str(lm_dir)]
    procs = []
    for rank in (0, 1):
        cmd = [str(venv_bin / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mtkd-test",
               "--rdzv-conf", "join_timeout=120", "-m", "mtkd_cache.cli", "run", str(sharded), *options]
        procs.append(subprocess.Popen(cmd, env=subprocess_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        run_teacher(single, RunConfig(teacher="lm", model=str(lm_dir), top_k=8, device="cpu"), progress=False)
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a, b = teacher_arrays(single, "lm"), teacher_arrays(sharded, "lm")
    assert sorted(a) == sorted(b) == ["indices", "tail", "values"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert pq.read_table(single / "teachers/lm/chunks.parquet").equals(pq.read_table(sharded / "teachers/lm/chunks.parquet"))
