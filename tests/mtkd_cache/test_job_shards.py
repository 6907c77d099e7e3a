"""Job arrays: 3 shard processes started independently (one killed and rerun), then `finalize`.

The stored arrays and per-chunk checksums must be bit-identical to one single run's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers.remote_cache import FACTORY, IDS, LABELS, read_arrays

from mtkd_cache import RunConfig, prepare_arrays, run_teacher, verify_cache
from mtkd_cache.cli import main
from mtkd_cache.errors import CacheIncompleteError
from mtkd_cache.precompute.shards import finalize_teacher, parse_shard, run_shard

KW = {"vocab_size": 64, "num_classes": 4}


def _shard(cache: Path, i: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mtkd_cache.cli", "run", str(cache), "--shard", f"{i}/3", "--teacher", "fac",
           "--model", FACTORY, "--model-kwargs", json.dumps(KW), "--top-k", "2", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow  # four teacher processes: ~2 min on 2 shared cores
def test_three_shard_processes_one_killed_and_rerun_equal_a_single_run(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    base = tmp_path / "base"
    prepare_arrays(base, {"input_ids": IDS}, labels=LABELS, chunk_samples=4)  # 5 chunks
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(base, single)
    shutil.copytree(base, sharded)
    run_teacher(single, RunConfig(teacher="fac", model=FACTORY, top_k=2), factory_kwargs=KW, progress=False)

    victim = _shard(sharded, 1, subprocess_env)
    time.sleep(1.0)
    victim.kill()  # wherever it was: claiming, computing or committing
    victim.wait(timeout=30)
    procs = [_shard(sharded, i, subprocess_env) for i in (0, 1, 2)]  # shard 1 rerun, all concurrently
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    assert not (sharded / "teachers/fac/teacher.json").exists()  # complete only after finalize
    res = CliRunner().invoke(main, ["finalize", str(sharded), "--teacher", "fac"])
    assert res.exit_code == 0, res.output
    assert verify_cache(sharded, progress=False).ok
    for got, want in zip(read_arrays(str(sharded)), read_arrays(str(single)), strict=True):
        np.testing.assert_array_equal(got, want)
    _assert_bit_identical(sharded, single)


def _assert_bit_identical(got: Path, want: Path) -> None:
    shards = sorted(p.relative_to(want) for p in (want / "teachers/fac").rglob("*") if p.is_file() and "/c/" in str(p))
    assert len(shards) >= 15
    for f in shards:
        assert (got / f).read_bytes() == (want / f).read_bytes(), f
    table = pq.read_table(got / "teachers/fac/chunks.parquet").to_pydict()
    assert table["checksum"] == pq.read_table(want / "teachers/fac/chunks.parquet").to_pydict()["checksum"]


def test_shards_in_any_order_then_finalize_equal_a_single_run(tmp_path: Path) -> None:
    base = tmp_path / "base"
    prepare_arrays(base, {"input_ids": IDS}, labels=LABELS, chunk_samples=4)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    shutil.copytree(base, single)
    shutil.copytree(base, sharded)
    cfg = RunConfig(teacher="fac", model=FACTORY, top_k=2, device="cpu")
    run_teacher(single, cfg, factory_kwargs=KW, progress=False)
    reports = [run_shard(sharded, cfg, (i, 3), factory_kwargs=KW, progress=False) for i in (2, 0)]
    assert reports[0].chunks == [3, 4] and reports[1].chunks == [0] and reports[1].remaining == 2
    with pytest.raises(CacheIncompleteError, match=r"chunks \[1, 2\] are not committed"):
        finalize_teacher(sharded, "fac")
    assert run_shard(sharded, cfg, (1, 3), factory_kwargs=KW, progress=False).remaining == 0
    finalize_teacher(sharded, "fac")
    assert verify_cache(sharded, progress=False).ok
    _assert_bit_identical(sharded, single)


def test_parse_shard_names_the_flag() -> None:
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
