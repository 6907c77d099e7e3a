"""The trainer's CUDA paths: autocast in bf16 and fp16 (with the loss scaler) over float32 master
weights, fused AdamW, device-side evaluation. Skipped without CUDA; ready for a GPU machine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe
from tests.mtkd_train._train_target import LMCache, read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trains_and_evaluates_on_cuda(lm_cache: LMCache, tmp_path: Path, amp: str) -> None:
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student),
                      out=str(tmp_path), batch_size=4, max_steps=4, device="cuda", amp=amp,
                      eval_cache=str(lm_cache.cache), eval_max_samples=8, progress=False)  # fmt: skip
    recipe = DistillRecipe(cfg).setup()
    assert recipe.scaler.is_enabled() == (amp == "fp16")
    recipe.train()
    assert {p.dtype for p in recipe.student.module.parameters()} == {torch.float32}
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))
    res = recipe.evaluate()["student"]
    assert res["positions"] > 0 and 1 < res["perplexity"] < 1e4
    resumed = DistillRecipe(TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 5})).setup(resume=True)
    assert resumed.step == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_row_kernels_on_cuda_equal_the_eager_ones(dtype: torch.dtype) -> None:
    """The row kernels compile to Triton on CUDA; both fused paths give the eager values there."""
    from mtkd_train.losses import fused_kd_ce_loss, fused_linear_kd_ce_loss
    from mtkd_train.targets import from_dense

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).to("cuda", dtype).requires_grad_(True)
    w = (torch.randn(1000, 32, generator=g) * 0.3).to("cuda", dtype).requires_grad_(True)
    t = from_dense(torch.softmax(torch.randn(64, 1000, generator=g) * 3, dim=1), 16)
    t = type(t)(t.indices.cuda(), t.logp.cuda(), t.tail.cuda())
    labels = torch.randint(0, 1000, (64,), generator=g).cuda()
    got = {}
    for kernels in ("eager", "compiled"):
        head = fused_linear_kd_ce_loss(h, w, t, labels, alpha=0.5, kernels=kernels).loss
        z = (h @ w.T).detach().requires_grad_(True)
        logits = fused_kd_ce_loss(z, t, labels, alpha=0.5, kernels=kernels).loss
        got[kernels] = (head.detach(), *torch.autograd.grad(head, (h, w)), logits.detach(),
                        torch.autograd.grad(logits, z)[0])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(got["eager"], got["compiled"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
