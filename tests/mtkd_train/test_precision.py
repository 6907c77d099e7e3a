"""Mixed precision and per-rank randomness on CPU (issue 15): the fp16 loss scaler, float32 master
weights for a student saved in bf16, and each rank's own RNG stream in checkpoints."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe
from mtkd_train.rng import gather_rng_states, restore_rng, seed_all
from mtkd_train.student import load_student
from tests.mtkd_train._train_target import LMCache, read_metrics


def _cfg(lm: LMCache, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "cache": str(lm.cache), "teachers": ("a", "b"), "student": str(lm.student), "out": str(out),
        "batch_size": 4, "max_steps": 3, "checkpoint_every": 2, "lr": 3e-3, "warmup_steps": 0,
        "device": "cpu", "progress": False,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_fp16_uses_a_loss_scaler_unscales_before_clipping_and_checkpoints_it(
    lm_cache: LMCache, tmp_path: Path
) -> None:
    off = DistillRecipe(_cfg(lm_cache, tmp_path / "off", amp="off")).setup()
    off.train()
    fp16 = DistillRecipe(_cfg(lm_cache, tmp_path / "fp16", amp="fp16")).setup()
    assert fp16.scaler.is_enabled() and not off.scaler.is_enabled()
    fp16.train()
    norms = {name: read_metrics(tmp_path / name)[0]["grad_norm"] for name in ("off", "fp16")}
    # clipping saw the true gradient norm, not one scaled by 2**16
    assert norms["fp16"] == pytest.approx(norms["off"], rel=0.05), norms
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "fp16"))
    saved = torch.load(tmp_path / "fp16" / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert saved["scaler"]["scale"] == fp16.scaler.get_scale() > 1

    resumed = DistillRecipe(_cfg(lm_cache, tmp_path / "fp16", amp="fp16", max_steps=4)).setup(resume=True)
    assert resumed.scaler.get_scale() == fp16.scaler.get_scale()


def test_bf16_saved_student_trains_with_float32_master_weights(lm_cache: LMCache, tmp_path: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(lm_cache.student)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16_student")
    student = load_student(str(tmp_path / "bf16_student"))
    params = dict(student.module.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.float()), name

    recipe = DistillRecipe(_cfg(lm_cache, tmp_path / "run", student=str(tmp_path / "bf16_student"),
                                amp="bf16", max_steps=2)).setup()  # fmt: skip
    before = recipe.student.module.lm_head.weight.detach().clone()
    recipe.train()
    after = recipe.student.module.lm_head.weight
    assert after.dtype == torch.float32
    # an update smaller than bf16's resolution still lands in the float32 master weights
    assert not torch.equal(after.bfloat16().float(), after.detach())
    assert not torch.equal(after, before)


def test_each_rank_gets_its_own_rng_state_back() -> None:
    cpu = torch.device("cpu")
    states = []
    for rank in range(2):
        seed_all(10 + rank)
        states.append(gather_rng_states(cpu, 1)[0])
    want = torch.rand(3)  # rank 1's stream right after its state was saved
    restore_rng(states, 1, cpu, seed=10, step=5)
    assert torch.equal(torch.rand(3), want)
    restore_rng(states, 0, cpu, seed=10, step=5)
    r0 = (torch.rand(3), random.random())
    seed_all(10)
    assert torch.equal(torch.rand(3), r0[0]) and random.random() == r0[1]
    # a rank the checkpoint has no state for (the world grew) is re-seeded deterministically
    restore_rng(states, 3, cpu, seed=10, step=5)
    a = torch.rand(3)
    restore_rng(states, 3, cpu, seed=10, step=5)
    assert torch.equal(torch.rand(3), a) and not torch.equal(a, r0[0])
