"""CUDA paths of precompute: one GPU, torchrun over GPUs (each rank pinned to its own), and a teacher
spread over several GPUs with `--device-map`. Skipped without CUDA; ready for a GPU machine."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd_cache import RunConfig, run_teacher
from tests.mtkd_cache.conftest import REPO_ROOT
from tests.mtkd_cache.test_distributed import teacher_arrays

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def fp32_run(cache: Path, lm_dir: Path, name: str, **kw: object) -> None:
    run_teacher(cache, RunConfig(teacher=name, model=str(lm_dir), top_k=8, dtype="fp32", **kw),  # type: ignore[arg-type]
                progress=False)


def test_one_gpu_matches_the_cpu(copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path) -> None:
    cache = copy_cache(inputs_template)
    fp32_run(cache, lm_dir, "cpu", device="cpu")
    fp32_run(cache, lm_dir, "gpu", device="cuda")
    a, b = teacher_arrays(cache, "cpu"), teacher_arrays(cache, "gpu")
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_allclose(a["tail"].astype(np.float32), b["tail"].astype(np.float32), atol=2e-3)


@TWO_GPUS
def test_torchrun_over_two_gpus_pins_each_rank_and_matches_one_gpu(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, subprocess_env: dict[str, str],
    venv_bin: Path,
) -> None:
    single, sharded = copy_cache(inputs_template, "single"), copy_cache(inputs_template, "sharded")
    fp32_run(single, lm_dir, "lm", device="cuda")
    cmd = [str(venv_bin / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mtkd_cache.cli", "run",
           str(sharded), "--teacher", "lm", "--model", str(lm_dir), "--top-k", "8", "--dtype", "fp32",
           "--device", "cuda"]
    proc = subprocess.run(cmd, env=subprocess_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = teacher_arrays(single, "lm"), teacher_arrays(sharded, "lm")
    np.testing.assert_array_equal(a["indices"], b["indices"])


@TWO_GPUS
def test_device_map_spreads_a_teacher_over_gpus(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path
) -> None:
    cache = copy_cache(inputs_template)
    fp32_run(cache, lm_dir, "one", device="cuda")
    fp32_run(cache, lm_dir, "spread", device="cuda", device_map="balanced", max_memory={0: "1GiB", 1: "1GiB"})
    np.testing.assert_array_equal(teacher_arrays(cache, "one")["indices"], teacher_arrays(cache, "spread")["indices"])
