"""`DistillRecipe` in process: every operator through the real trainer, the gate and feature
losses learning, the schedule, gradient accumulation, evaluation during training and saving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.data import CachedDistillDataset
from mtkd_train.evaluate import eval_batches
from mtkd_train.recipe import DistillRecipe
from mtkd_train.rows import to_device
from mtkd_train.student import load_student
from tests.mtkd_train._train_target import LMCache, read_metrics


def _cfg(lm: LMCache, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "cache": str(lm.cache), "teachers": ("a", "b"), "student": str(lm.student),
        "out": str(out), "batch_size": 4, "max_steps": 3, "checkpoint_every": 100,
        "lr": 3e-3, "warmup_steps": 0,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _train(cfg: TrainConfig) -> DistillRecipe:
    recipe = DistillRecipe(cfg).setup()
    recipe.train()
    return recipe


@pytest.mark.parametrize(
    ("aggregate", "kwargs"),
    [
        ("mean", {"weights": [3, 1]}),
        ("loglinear", {}),
        ("entropy", {"tau": 0.5}),
        ("confidence", {}),
        ("label_aware", {}),
        ("gate", {}),
        ("routing", {"domain_to_teacher": {"x": "a", "y": "b"}}),
        ("mtbkd", {}),
    ],
)
def test_every_operator_trains_in_the_recipe(
    lm_cache: LMCache, tmp_path: Path, aggregate: str, kwargs: dict[str, Any]
) -> None:
    recipe = _train(_cfg(lm_cache, tmp_path, aggregate=aggregate, aggregate_kwargs=kwargs))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "kd", "ce", "grad_norm")), r
        weights = r.get("gate_weights", r.get("teacher_weights"))
        assert (weights is None) == (aggregate == "loglinear")
        if weights is not None:
            assert math.isclose(sum(weights), 1.0, abs_tol=1e-5)
    assert recipe.losses == [r["loss"] for r in records]
    if aggregate == "mean":
        assert records[0]["teacher_weights"] == pytest.approx([0.75, 0.25])
    if aggregate == "routing":
        # one-hot by domain: the mean weight of teacher a is the share of positions from domain x
        ds = CachedDistillDataset(lm_cache.cache, batch_size=4, seed=0, shuffle_chunks=4)
        batch = next(iter(ds))
        x = recipe.reader.inputs.domains.index("x")
        rows = batch["position_mask"]
        share = float((batch["domains"].view(-1, 1).expand(rows.shape)[rows] == x).float().mean())
        assert records[0]["teacher_weights"] == pytest.approx([share, 1 - share], abs=1e-6)
        assert 0 < share < 1


def test_gate_parameters_change(lm_cache: LMCache, tmp_path: Path) -> None:
    recipe = DistillRecipe(_cfg(lm_cache, tmp_path, aggregate="gate", max_steps=4)).setup()
    gate = recipe.objective.gate
    assert gate is not None
    before = {k: v.clone() for k, v in gate.state_dict().items()}
    recipe.train()
    changed = [k for k, v in gate.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(before)
    logged = [r["gate_weights"] for r in read_metrics(tmp_path)]
    assert logged[0] == pytest.approx([0.5, 0.5])  # the gate starts as the mean
    assert logged[-1] != logged[0]


def test_feature_distillation_reduces_the_feature_loss(lm_cache: LMCache, tmp_path: Path) -> None:
    cfg = _cfg(lm_cache, tmp_path, features={"a": {"layer": -1}}, max_steps=20, lr=1e-2)
    _train(cfg)
    feat = [r["feat"] for r in read_metrics(tmp_path)]
    assert len(feat) == 20 and all(math.isfinite(f) for f in feat)
    assert sum(feat[-4:]) / 4 < 0.7 * sum(feat[:4]) / 4, feat


def test_lr_schedule_is_logged_for_the_step_it_was_used(lm_cache: LMCache, tmp_path: Path) -> None:
    cfg = _cfg(lm_cache, tmp_path, lr=1e-2, warmup_steps=2, max_steps=4, min_lr_ratio=0.1)
    _train(cfg)
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    cosine_half = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs == pytest.approx([0.5e-2, 1e-2, 1e-2, 1e-2 * cosine_half])


def test_grad_accum_consumes_every_micro_batch(lm_cache: LMCache, tmp_path: Path) -> None:
    recipe = _train(_cfg(lm_cache, tmp_path, grad_accum=2, batch_size=2, max_steps=3))
    assert recipe.dataset.state.samples_consumed == 3 * 2 * 2
    state = recipe.dataset.state_dict()
    assert (state["epoch"], state["samples_consumed"]) == (0, 12)


def test_saved_student_loads_with_from_pretrained(lm_cache: LMCache, tmp_path: Path) -> None:
    cfg = _cfg(lm_cache, tmp_path, eval_cache=str(lm_cache.cache), eval_every=2, max_steps=4,
               eval_max_samples=8)  # fmt: skip
    recipe = _train(cfg)
    path = recipe.save()
    assert path == tmp_path / "student"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    fresh = load_student(str(lm_cache.student), seed=cfg.seed).module.eval()
    module = recipe.student.module.eval()
    batch = next(eval_batches(recipe.reader, batch_size=4))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = module(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, want)
        assert not torch.allclose(fresh(**inputs).logits, want)  # what was saved is trained
    evals = [r for r in read_metrics(tmp_path) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval"]["student"]["positions"] > 0 for r in evals)


def test_feature_student_layer_is_honoured(lm_cache: LMCache, tmp_path: Path) -> None:
    cfg = _cfg(lm_cache, tmp_path, features={"a": {"layer": -1, "student_layer": 0}}, aggregate="gate")
    recipe = _train(cfg)
    assert recipe.objective.hidden_layers == (-1, 0)  # the gate reads the last layer, the feature term layer 0
    assert all(math.isfinite(r["feat"]) for r in read_metrics(tmp_path))


def test_sequence_classifier_student_on_token_inputs(lm_cache: LMCache, tmp_path: Path) -> None:
    """Per-sample targets over token inputs: one scored row per sample, not one per token."""
    from tests.helpers.tiny_models import save_tiny_bert_classifier

    folder = save_tiny_bert_classifier(tmp_path / "bert", num_labels=3, vocab_size=32, seed=7)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match="no labels for the CE term"):
        DistillRecipe(_cfg(lm_cache, tmp_path / "run", teachers=("cls",), student=str(folder))).setup()
    recipe = _train(_cfg(lm_cache, tmp_path / "run", teachers=("cls",), student=str(folder), aggregate="mean",
                         max_steps=2, alpha=1.0, merge_in="step"))  # raw batches: no row_index yet  # fmt: skip
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in records)
    assert all(r["ce"] == 0 for r in records)
    batch = next(iter(recipe._loader()))
    assert "row_index" not in batch  # so the first forward below takes the boolean mask
    recipe.model.eval()  # no dropout: two forwards must agree
    with_index = recipe.model(to_device(batch, recipe.device, per_token=False))["kd"]
    assert torch.equal(recipe.model(batch)["kd"], with_index)  # host-made index == boolean mask
