"""`Objective(loss_impl=...)`: the fused default equals the reference path on real cached targets.

Every operator x tail mode, T != 1: the same loss, KD and CE values and the same gradients with
respect to the student's logits and the gate's parameters (float32, so within 1e-5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.kernels import row_kernels  # noqa: F401 - every test runs eager and compiled

from mtkd_train.aggregate import GateNetwork
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.data import CachedDistillDataset
from mtkd_train.objective import Objective
from tests.mtkd_train._train_target import VOCAB, LMCache

OPERATORS = ("mean", "loglinear", "entropy", "confidence", "label_aware", "gate", "routing", "mtbkd")
HIDDEN = 8


@pytest.fixture(scope="module")
def batch(lm_cache: LMCache) -> dict[str, Any]:
    return next(iter(CachedDistillDataset(lm_cache.cache, ["a", "b"], batch_size=6, shuffle=False)))


def _terms(batch: dict[str, Any], aggregate: str, tail: str, impl: str) -> tuple[dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    gate = GateNetwork(HIDDEN, 2, gate_hidden=8) if aggregate == "gate" else None
    if gate is not None:
        torch.nn.init.normal_(gate.net[2].weight)  # a non-uniform gate, so its gradient is not trivial
    akw: dict[str, Any] = {"domain_to_teacher": {0: 0, 1: 1}} if aggregate == "routing" else {}
    akw.update({"prior_strength": 0.2} if aggregate == "mtbkd" else {})
    obj = Objective(teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate=aggregate,
                    aggregate_kwargs=akw, loss="forward_kl", tail_mode=tail, alpha=0.4, temperature=2.0, gate=gate,
                    gate_entropy=0.01, loss_impl=impl)
    g = torch.Generator().manual_seed(0)
    b, length = batch["input_ids"].shape
    logits = torch.randn(b, length, VOCAB + 8, generator=g).requires_grad_()
    hidden = torch.randn(b, length, HIDDEN, generator=g)
    terms = obj(batch, logits, hidden, "causal_lm")
    params = [logits, *obj.parameters()]
    return terms, list(torch.autograd.grad(terms["loss"], params))


@pytest.mark.parametrize("tail", ["bucket", "spread"])
@pytest.mark.parametrize("aggregate", OPERATORS)
def test_fused_objective_equals_reference(batch: dict[str, Any], aggregate: str, tail: str) -> None:
    fused, g_fused = _terms(batch, aggregate, tail, "fused")
    ref, g_ref = _terms(batch, aggregate, tail, "reference")
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(fused[key], ref[key], atol=1e-5, rtol=1e-6)
    assert len(g_fused) == len(g_ref) == (1 + (4 if aggregate == "gate" else 0))
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_loss_impl_is_validated_and_auto_keeps_other_divergences_on_the_reference() -> None:
    base = {"cache": "c", "teachers": ("a",), "student": "s"}
    with pytest.raises(ConfigError, match="loss-impl"):
        TrainConfig(**base, loss_impl="fast")
    with pytest.raises(ConfigError, match="forward_kl"):
        TrainConfig(**base, loss="js", loss_impl="fused")
    assert TrainConfig(**base).loss_impl == "auto"
    common: dict[str, Any] = dict(teachers=["a"], capture_temperatures=[1.0], vocab_size=VOCAB, aggregate="mean",
                                  aggregate_kwargs={}, tail_mode="bucket", alpha=0.5, temperature=1.0)
    assert Objective(loss="forward_kl", **common).fused
    assert not Objective(loss="js", **common).fused
    assert not Objective(loss="forward_kl", loss_impl="reference", **common).fused


def test_head_fused_objective_equals_logits_path_on_a_real_student(lm_cache: LMCache, batch: dict[str, Any]) -> None:
    from mtkd_train.student import load_student

    student = load_student(str(lm_cache.student), seed=0)
    assert student.supports_fused_head()
    student.module.eval()  # no dropout: both paths see the same network
    results = []
    for impl in ("fused_head", "reference"):
        obj = Objective(teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate="entropy",
                        aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=0.3, temperature=2.0,
                        loss_impl=impl)
        assert obj.head_fused == (impl == "fused_head")
        inputs: Any = (student.forward_head(batch)[0] if obj.head_fused else student.forward(batch)[0])
        loss = obj(batch, inputs, None, "causal_lm")["loss"]
        params = list(student.module.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    (loss_h, g_h), (loss_r, g_r) = results
    torch.testing.assert_close(loss_h, loss_r, atol=1e-5, rtol=1e-6)
    for a, b in zip(g_h, g_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_student_that_scales_its_logits_keeps_the_logits_path(lm_cache: LMCache) -> None:
    from mtkd_train.student import load_student

    student = load_student(str(lm_cache.student), seed=0)
    head = student.module.get_output_embeddings()
    student.module.forward = _scaled(student.module.forward)  # e.g. a logit scale after the head
    assert isinstance(head, torch.nn.Linear) and not student.supports_fused_head()


def _scaled(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    return run


def test_the_configured_kernels_reach_the_fused_loss(lm_cache: LMCache, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mtkd_train.objective as objective
    from mtkd_train.recipe import DistillRecipe

    seen: list[Any] = []
    real = objective.fused_linear_kd_ce_loss

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw.get("kernels"))
        return real(*args, **kw)

    monkeypatch.setattr(objective, "fused_linear_kd_ce_loss", spy)
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(tmp_path),
                      batch_size=2, max_steps=1, kernels="compiled", progress=False)
    recipe = DistillRecipe(cfg).setup()
    recipe.train()
    assert recipe.objective.kernels == "compiled" and seen and set(seen) == {"compiled"}
