"""Where a teacher runs: `--device-map` (accelerate, teachers larger than one GPU), each rank's GPU
block, and the note `--device auto` prints. The CUDA paths themselves are in test_gpu.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_models

from mtkd_cache import RunConfig, open_cache
from mtkd_cache.cli import main
from mtkd_cache.errors import DeviceError, UnsupportedTeacherError
from mtkd_cache.precompute.device import gpu_group
from mtkd_cache.precompute.forward import forward_teacher
from mtkd_cache.precompute.models import load_teacher
from tests.mtkd_cache.test_distributed import teacher_arrays

CPU = torch.device("cpu")


def test_device_map_with_a_budget_that_forces_offload_gives_the_same_logits(lm_dir: Path) -> None:
    whole = load_teacher(str(lm_dir), device=CPU, dtype=torch.float32)
    mapped = load_teacher(str(lm_dir), device=CPU, dtype=torch.float32, device_map="auto",
                          max_memory={"cpu": "20KB"})
    assert set(mapped.module.hf_device_map.values()) == {"disk"}, "the budget must force offload"
    batch = {"input_ids": torch.randint(0, 60, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    a, _ = forward_teacher(whole, batch, want_hidden=False)
    b, _ = forward_teacher(mapped, batch, want_hidden=False)
    torch.testing.assert_close(a, b)
    assert (mapped.weights_hash, mapped.vocab_size) == (whole.weights_hash, whole.vocab_size)


def test_run_with_device_map_writes_what_a_plain_run_writes(
    copy_cache: Callable[..., Path], lm_template: Path, lm_dir: Path
) -> None:
    cache = copy_cache(lm_template)
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "mapped", "--model", str(lm_dir),
                                       "--top-k", "8", "--device-map", "auto", "--max-memory", "cpu=20KB"])
    assert result.exit_code == 0, result.output
    a, b = teacher_arrays(cache, "lm"), teacher_arrays(cache, "mapped")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta = open_cache(cache).teacher("mapped").meta
    assert meta.settings() == {**open_cache(cache).teacher("lm").meta.settings(), "name": "mapped"}


def test_device_map_needs_a_hugging_face_teacher() -> None:
    with pytest.raises(UnsupportedTeacherError, match=r"--device-map auto needs a Hugging Face model.*drop --device-map"):
        load_teacher(f"{tiny_models.__name__}:tiny_factory_lm", device=CPU, dtype=torch.float32, device_map="auto")


def test_max_memory_without_device_map_and_bad_budgets_are_refused(lm_template: Path, lm_dir: Path) -> None:
    with pytest.raises(ValueError, match="--max-memory only applies with --device-map"):
        RunConfig(teacher="t", model="m", max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="--device-map must be"):
        RunConfig(teacher="t", model="m", device_map="everywhere")
    result = CliRunner().invoke(main, ["run", str(lm_template), "--teacher", "t", "--model", str(lm_dir),
                                       "--device-map", "auto", "--max-memory", "gpu0:40GiB"])
    assert result.exit_code == 2 and "DEVICE=AMOUNT" in result.output


@pytest.mark.parametrize(
    ("local_rank", "local_world", "gpus", "expected"),
    [(0, 1, 8, list(range(8))), (0, 2, 8, [0, 1, 2, 3]), (1, 2, 8, [4, 5, 6, 7]), (2, 3, 8, [4, 5]), (7, 8, 8, [7])],
)
def test_each_rank_owns_an_equal_disjoint_block_of_gpus(local_rank: int, local_world: int, gpus: int,
                                                         expected: list[int]) -> None:
    assert gpu_group(local_rank, local_world, gpus) == expected


def test_more_ranks_than_gpus_is_refused() -> None:
    with pytest.raises(DeviceError, match=r"4 ranks on this node but only 2 GPU\(s\).*--nproc_per_node"):
        gpu_group(0, 4, 2)


def test_device_auto_says_what_it_chose(copy_cache: Callable[..., Path], lm_template: Path, lm_dir: Path) -> None:
    cache = copy_cache(lm_template)
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "auto", "--model", str(lm_dir), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"mtkd-cache: teacher 'auto' runs on {expected} in torch." in result.output
