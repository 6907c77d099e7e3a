"""Gradient accumulation in process: `grad_accum=2, batch_size=2` is one step over the same four
samples as `grad_accum=1, batch_size=4`, so the gradients the optimizer sees and the parameters
after the step must agree.

The image cache has one row per sample and the KD loss is a mean over rows, so the mean of two
half-batch losses is exactly the full-batch loss (alpha=1: the CE term, a mean over *labelled*
rows only, would weigh samples differently). Gradients are compared, not only parameters: Adam's
first step is nearly sign(g) * lr, so it would hide a loss that is not divided by `grad_accum`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe
from tests.mtkd_train._train_target import IMAGE_STUDENT, ImageCache


def _one_step(image: ImageCache, out: Path, **kw: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gradients seen by the first optimizer step and the parameters after it."""
    cfg = TrainConfig(
        cache=str(image.cache), teachers=("v1", "v2"), student=IMAGE_STUDENT, out=str(out),
        student_kwargs={"dropout": 0.0}, aggregate="entropy", alpha=1.0, max_steps=1,
        warmup_steps=0, lr=1e-2, clip_grad=0.0, checkpoint_every=0, device="cpu", amp="off",
        progress=False, **kw,
    )  # fmt: skip
    recipe = DistillRecipe(cfg).setup()
    grads: dict[str, torch.Tensor] = {}

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for name, p in recipe.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    recipe.optimizer.register_step_pre_hook(record)
    recipe.train()
    params = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    return grads, params


def test_two_micro_batches_of_two_equal_one_batch_of_four(image_cache: ImageCache, tmp_path: Path) -> None:
    g_full, p_full = _one_step(image_cache, tmp_path / "full", batch_size=4, grad_accum=1)
    g_accum, p_accum = _one_step(image_cache, tmp_path / "accum", batch_size=2, grad_accum=2)
    assert g_full and set(g_full) == set(g_accum)
    assert any(float(g.abs().max()) > 1e-4 for g in g_full.values()), "the step must move something"
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p_accum[name], p_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_different_batch_gives_different_gradients(image_cache: ImageCache, tmp_path: Path) -> None:
    """The comparison above is not vacuous: two samples alone do not give the four-sample gradient."""
    g_full, _ = _one_step(image_cache, tmp_path / "full", batch_size=4, grad_accum=1)
    g_half, _ = _one_step(image_cache, tmp_path / "half", batch_size=2, grad_accum=1)
    assert any(not torch.allclose(g_half[n], g_full[n], rtol=1e-3) for n in g_full)
