"""DDP: each rank streams its own slice of every global batch, and `torchrun` with two CPU ranks
(gloo) trains the same student as one process accumulating the same two micro-batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from mtkd_cache import open_cache
from mtkd_train.checkpoint import latest_checkpoint
from mtkd_train.cli import main
from mtkd_train.data import CachedDistillDataset
from mtkd_train.evaluate import evaluate_student
from mtkd_train.student import load_student
from tests.mtkd_train._train_target import LMCache, read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_ranks_stream_disjoint_slices_of_the_global_batch(lm_cache: LMCache) -> None:
    def ids(rank: int, world: int, batch: int, n: int) -> list[list[int]]:
        ds = CachedDistillDataset(
            lm_cache.cache, ["a"], batch_size=batch, rank=rank, world_size=world, seed=3, lanes=1
        )
        it = iter(ds)
        return [next(it)["sample_ids"].tolist() for _ in range(n)]

    single = ids(0, 1, 6, 8)  # 48 samples: past the end of the 40-sample epoch
    r0, r1 = ids(0, 2, 3, 8), ids(1, 2, 3, 8)
    for step in range(8):
        assert not set(r0[step]) & set(r1[step])
        assert r0[step] + r1[step] == single[step]


# --lanes 1: rank r takes the r-th slice of each global batch, i.e. the same split into micro-batches as
# one process accumulating them (the per-micro-batch loss means make the gradients depend on the split);
# the default lanes (rank-disjoint decoding) are tested in tests/mtkd_train/data/test_lanes.py.
def _args(lm: LMCache, out: Path, *extra: str) -> list[str]:
    return [
        str(lm.cache), "--teachers", "a,b", "--student", str(lm.student), "--out", str(out),
        "--aggregate", "confidence", "--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0",
        *extra,
    ]  # fmt: skip


def test_torchrun_two_ranks_matches_one_process_with_grad_accum(
    lm_cache: LMCache, tmp_path: Path
) -> None:
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mtkd_train.cli", *_args(lm_cache, ddp_out, "--batch-size", "2", "--lanes", "1", "--eval-cache", str(lm_cache.cache),
                                       "--eval-max-samples", "12", "--no-eval-teachers"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student saved to" in proc.stdout

    # one process, the same global batch (2 ranks x 2) as two accumulated micro-batches of 2
    result = CliRunner().invoke(
        main, _args(lm_cache, one_out, "--batch-size", "2", "--grad-accum", "2", "--lanes", "1"),
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    assert [r["step"] for r in read_metrics(ddp_out)] == [1, 2, 3]  # rank 0 alone writes
    ddp = transformers.AutoModelForCausalLM.from_pretrained(ddp_out / "student").state_dict()
    one = transformers.AutoModelForCausalLM.from_pretrained(one_out / "student").state_dict()
    init = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(lm_cache.student)
    ).state_dict()
    for name, weight in one.items():
        torch.testing.assert_close(ddp[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(ddp["lm_head.weight"], init["lm_head.weight"])

    # each rank's own RNG stream is in the checkpoint (seeded seed + rank)
    state = torch.load(latest_checkpoint(ddp_out / "checkpoints"), weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # the evaluation was split across the ranks and reduced: it equals one process's evaluation
    student = load_student(str(ddp_out / "student"))
    alone = evaluate_student(student, open_cache(lm_cache.cache), batch_size=2, max_samples=12, vocab_size=32)
    split = json.loads((ddp_out / "eval.json").read_text())["student"]
    assert split["positions"] == alone["positions"] > 0
    assert split["nll"] == pytest.approx(alone["nll"], rel=1e-5)
    assert split["accuracy"] == alone["accuracy"] and split["ece"] == pytest.approx(alone["ece"], abs=1e-6)
