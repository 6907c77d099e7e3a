"""`teacher_side`: the teachers merged where the batch is made give the step exactly what merging in it gives.

The objective runs once on a raw batch (it merges inside the step) and once on the same batch
after `LoaderMerge` (the loader merged it): the loss terms and the gradients must be identical,
for every operator the loader can merge, both tail modes, T != 1, rows without any teacher
(cross-tokenizer presence), a classifier student, and through the trainer itself.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtkd_train.aggregate import AggregationInputError
from mtkd_train.config import TrainConfig
from mtkd_train.data import CachedDistillDataset
from mtkd_train.objective import Objective
from mtkd_train.recipe import DistillRecipe
from mtkd_train.student import HeadInputs
from mtkd_train.teacher_side import LoaderMerge, Merged
from tests.mtkd_train._train_target import IMAGE_CLASSES, VOCAB, ImageCache, LMCache, read_metrics

MERGEABLE = ("mean", "loglinear", "entropy", "confidence", "label_aware", "routing", "mtbkd")


@pytest.fixture(scope="module")
def batch(lm_cache: LMCache) -> dict[str, Any]:
    return next(iter(CachedDistillDataset(lm_cache.cache, ["a", "b"], batch_size=6, shuffle=False)))


def _objective(aggregate: str, tail: str, temperature: float = 2.0, teachers: tuple[str, ...] = ("a", "b"),
               vocab: int = VOCAB, capture: tuple[float, ...] | None = None, **kw: Any) -> Objective:
    akw: dict[str, Any] = {"domain_to_teacher": {0: 0, 1: 1}} if aggregate == "routing" else {}
    return Objective(teachers=list(teachers), capture_temperatures=list(capture or [1.0] * len(teachers)), vocab_size=vocab,
                     aggregate=aggregate, aggregate_kwargs=akw, loss="forward_kl", tail_mode=tail, alpha=0.5,
                     temperature=temperature, **kw)


def _terms_and_grad(objective: Objective, batch: dict[str, Any], logits: torch.Tensor, task: str = "causal_lm"
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    z = logits.detach().clone().requires_grad_()
    terms = objective(batch, z, None, task)
    terms["loss"].backward()
    assert z.grad is not None
    return {k: v.detach() for k, v in terms.items()}, z.grad


def _assert_same(objective: Objective, batch: dict[str, Any], logits: torch.Tensor, task: str = "causal_lm") -> None:
    transform = objective.loader_transform(task)
    assert isinstance(transform, LoaderMerge)
    merged_batch = transform(batch)
    assert "merged" in merged_batch and "merged" not in batch  # the input batch is left as it was
    assert "targets" not in merged_batch and "targets" in batch  # the step reads only the merged target
    in_step, g_step = _terms_and_grad(objective, batch, logits, task)
    in_loader, g_loader = _terms_and_grad(objective, merged_batch, logits, task)
    assert in_step.keys() == in_loader.keys()
    for key in in_step:
        assert torch.equal(in_step[key], in_loader[key]), key
    assert torch.equal(g_step, g_loader)


def _logits(batch: dict[str, Any], width: int = VOCAB + 8) -> torch.Tensor:
    b, length = batch["input_ids"].shape
    return torch.randn(b, length, width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", ["bucket", "spread"])
@pytest.mark.parametrize("aggregate", MERGEABLE)
def test_merged_in_the_loader_equals_merged_in_the_step(batch: dict[str, Any], aggregate: str, tail: str,
                                                        temperature: float) -> None:
    _assert_same(_objective(aggregate, tail, temperature), batch, _logits(batch))


@pytest.mark.parametrize("aggregate", MERGEABLE)
def test_targets_cached_at_other_temperatures(batch: dict[str, Any], aggregate: str) -> None:
    """Teachers cached at T = 0.7 and 1.5, distilled at T = 2: re-tempered in the loader as in the step."""
    _assert_same(_objective(aggregate, "spread", capture=(0.7, 1.5)), batch, _logits(batch))


@pytest.mark.parametrize(("aggregate", "tail"), [("entropy", "bucket"), ("loglinear", "spread"), ("mtbkd", "spread"),
                                                 ("label_aware", "bucket")])
def test_rows_without_a_teacher_keep_no_kd_term(batch: dict[str, Any], aggregate: str, tail: str) -> None:
    """Cross-tokenizer presence: some rows have one teacher, some none; the loader's kd_rows match the step's."""
    shape = batch["position_mask"].shape
    g = torch.Generator().manual_seed(3)
    a = torch.rand(shape, generator=g) < 0.7
    b = torch.rand(shape, generator=g) < 0.5
    targets = {"a": {**batch["targets"]["a"], "present": a}, "b": {**batch["targets"]["b"], "present": b}}
    present = {**batch, "targets": targets}
    objective = _objective(aggregate, tail)
    merged = objective.loader_transform("causal_lm")(present)  # type: ignore[misc]
    kd_rows = merged["merged"]["kd_rows"]
    assert not bool(kd_rows.all()) and bool(kd_rows.any())  # the case is really exercised
    assert torch.equal(kd_rows, (a | b).reshape(-1)[merged["row_index"]])
    _assert_same(objective, present, _logits(batch))


def test_the_lm_head_fused_loss_takes_a_merged_batch(batch: dict[str, Any]) -> None:
    objective = _objective("entropy", "spread", loss_impl="fused_head")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(*batch["input_ids"].shape, 16, generator=g)
    weight = torch.randn(VOCAB, 16, generator=g).requires_grad_()
    merged = objective.loader_transform("causal_lm")(batch)  # type: ignore[misc]
    grads, losses = [], []
    for b in (batch, merged):
        weight.grad = None
        terms = objective(b, HeadInputs(hidden, weight, None), None, "causal_lm")
        terms["loss"].backward()
        losses.append(terms["loss"].detach())
        grads.append(weight.grad.clone())  # type: ignore[union-attr]
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


def test_a_classifier_batch_is_merged_per_sample(image_cache: ImageCache) -> None:
    batch = next(iter(CachedDistillDataset(image_cache.cache, ["v1", "v2"], batch_size=8, shuffle=False)))
    objective = _objective("label_aware", "bucket", teachers=("v1", "v2"), vocab=IMAGE_CLASSES)
    merged = objective.loader_transform("image_classification")(batch)  # type: ignore[misc]
    assert merged["row_index"].tolist() == list(range(8))
    logits = torch.randn(8, 1, IMAGE_CLASSES, generator=torch.Generator().manual_seed(0))
    _assert_same(objective, batch, logits, task="image_classification")


def test_operators_that_read_the_student_are_merged_in_the_step(batch: dict[str, Any]) -> None:
    gate = _objective("gate", "bucket", hidden_size=8)
    assert gate.loader_transform("causal_lm") is None
    with pytest.raises(ValueError, match="gate"):
        gate.teacher_side.loader_transform("causal_lm")
    reference = Objective(teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate="mean",
                          aggregate_kwargs={}, loss="reverse_kl", tail_mode="bucket", alpha=0.5, temperature=1.0)
    assert reference.loader_transform("causal_lm") is None  # only the fused loss takes a merged target


def test_a_merged_batch_is_refused_where_the_step_must_merge(batch: dict[str, Any]) -> None:
    """A reference loss (or the gate) needs the raw targets a merged batch no longer has: one clear error."""
    merged = _objective("entropy", "bucket").loader_transform("causal_lm")(batch)  # type: ignore[misc]
    reference = Objective(teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate="entropy",
                          aggregate_kwargs={}, loss="reverse_kl", tail_mode="bucket", alpha=0.5, temperature=1.0)
    with pytest.raises(AggregationInputError, match="merge_in = step"):
        reference(merged, _logits(batch), None, "causal_lm")


def test_the_transform_pickles_for_spawned_workers(batch: dict[str, Any]) -> None:
    transform = _objective("mtbkd", "spread").loader_transform("causal_lm")
    again = pickle.loads(pickle.dumps(transform))
    a, b = Merged.from_batch(transform(batch)["merged"]), Merged.from_batch(again(batch)["merged"])  # type: ignore[misc]
    assert all(torch.equal(x, y) for x, y in zip(a.target, b.target, strict=True))
    assert a.negentropy is not None and torch.equal(a.negentropy, b.negentropy)  # type: ignore[arg-type]


def _run(lm_cache: LMCache, out: Path, merge_in: str, **kw: Any) -> tuple[DistillRecipe, list[dict[str, Any]]]:
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(out),
                      batch_size=4, max_steps=4, lr=1e-2, seed=3, checkpoint_every=0, merge_in=merge_in,
                      progress=False, **kw)
    recipe = DistillRecipe(cfg).setup()
    recipe.train()
    return recipe, read_metrics(out)


@pytest.mark.parametrize("kw", [
    {"aggregate": "entropy"},
    {"aggregate": "mean", "aggregate_kwargs": {"weights": [3, 1]}, "loss_impl": "fused"},
    {"aggregate": "routing", "aggregate_kwargs": {"domain_to_teacher": {"x": "a", "y": "b"}}, "tail_mode": "spread",
     "temperature": 2.0, "grad_accum": 2},
    {"aggregate": "mtbkd", "tail_mode": "spread", "features": {"a": {"layer": -1}}},
], ids=["entropy", "mean-fused", "routing-spread-T2-accum", "mtbkd-spread-features"])
def test_the_trainer_merges_in_the_loader_with_the_same_steps(lm_cache: LMCache, tmp_path: Path,
                                                               kw: dict[str, Any]) -> None:
    """Four steps with a worker process merging equal four steps merging in the step: losses and logged weights."""
    loader, at_loader = _run(lm_cache, tmp_path / "loader", "auto", num_workers=1, **kw)  # auto: the loader on the CPU
    step, at_step = _run(lm_cache, tmp_path / "step", "step", num_workers=0, **kw)
    assert loader.dataset.transform is not None and step.dataset.transform is None
    assert "merged" in next(iter(loader.dataset)) and "merged" not in next(iter(step.dataset))
    np.testing.assert_array_equal(loader.losses, step.losses)
    drop = ("positions_per_s", "seconds", "elapsed")
    assert [{k: v for k, v in r.items() if k not in drop} for r in at_loader] == \
        [{k: v for k, v in r.items() if k not in drop} for r in at_step]


def test_a_spawned_worker_merges_the_same_batch(lm_cache: LMCache, tmp_path: Path) -> None:
    """The dataset and its transform pickle into a spawned worker (macOS/Windows start workers so)."""
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student),
                      out=str(tmp_path / "run"), batch_size=4, aggregate="mtbkd", tail_mode="spread", merge_in="loader",
                      progress=False)
    recipe = DistillRecipe(cfg).setup()
    here = next(iter(recipe.dataset))
    loader = torch.utils.data.DataLoader(recipe.dataset, batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")
    there = next(iter(loader))
    for key in here["merged"]:
        assert torch.equal(here["merged"][key], there["merged"][key]), key
    assert torch.equal(here["row_index"], there["row_index"])
