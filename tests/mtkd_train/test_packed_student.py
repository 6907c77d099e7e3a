"""The student on packed samples: each document sees only itself, so a packed sample's KD and CE
sums equal those of its documents run alone (Llama architecture), within 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.packed_data import PACKED_VOCAB as VOCAB
from helpers.packed_data import build_packed_cache

from mtkd_train.data import CachedDistillDataset
from mtkd_train.objective import Objective
from mtkd_train.rows import loss_rows, row_labels
from mtkd_train.student import load_student


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_packed_cache(tmp_path_factory.mktemp("packed"))


@pytest.mark.parametrize("loss_impl", ["auto", "reference"])
def test_student_loss_on_a_packed_sample_equals_its_documents_alone(packed, loss_impl: str) -> None:  # noqa: ANN001
    student = load_student(str(packed["teacher"]), seed=0)
    student.module.eval()
    obj = Objective(teachers=["t"], capture_temperatures=[1.0], vocab_size=VOCAB - 8, aggregate="mean",
                    aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=0.5, temperature=1.0,
                    loss_impl=loss_impl)
    batch = next(iter(CachedDistillDataset(packed["cache"], ["t"], batch_size=1, shuffle=False)))
    n = int(batch["position_mask"].sum())
    starts = sorted({0, *torch.nonzero(batch["doc_start"][0, :n]).flatten().tolist()})
    assert len(starts) >= 3
    with torch.no_grad():
        terms = obj(batch, student.forward(batch)[0], None, "causal_lm")
        kd_sum = float(terms["kd"]) * int(loss_rows(batch).sum())
        ce_sum = float(terms["ce"]) * int((row_labels(batch, "causal_lm") != -100).sum())
        kd_alone, ce_alone = 0.0, 0.0
        for a, b in zip(starts, starts[1:] + [n]):
            one = {"input_ids": batch["input_ids"][:, a:b], "position_mask": batch["position_mask"][:, a:b],
                   "attention_mask": batch["attention_mask"][:, a:b], "sample_ids": batch["sample_ids"],
                   "targets": {"t": {k: v[:, a:b] for k, v in batch["targets"]["t"].items()}}}
            t = obj(one, student.forward(one)[0], None, "causal_lm")
            kd_alone += float(t["kd"]) * (b - a)
            ce_alone += float(t["ce"]) * (b - a - 1)
    assert kd_sum == pytest.approx(kd_alone, rel=1e-4, abs=1e-4)
    assert ce_sum == pytest.approx(ce_alone, rel=1e-4, abs=1e-4)
    leaky = {k: v for k, v in batch.items() if k != "doc_start"}
    with torch.no_grad():
        kd_leak = float(obj(leaky, student.forward(leaky)[0], None, "causal_lm")["kd"]) * n
    assert abs(kd_leak - kd_alone) > 1e-3


@pytest.mark.parametrize("loss_impl", ["fused_head", "reference"])
def test_the_recipe_trains_on_packed_samples(packed, tmp_path: Path, loss_impl: str) -> None:  # noqa: ANN001
    import math

    from mtkd_train.config import TrainConfig
    from mtkd_train.recipe import DistillRecipe

    cfg = TrainConfig(cache=str(packed["cache"]), teachers=("t",), student=str(packed["teacher"]), out=str(tmp_path),
                      batch_size=2, max_steps=2, checkpoint_every=100, lr=1e-3, warmup_steps=0, aggregate="mean",
                      num_workers=0, progress=False, loss_impl=loss_impl)
    recipe = DistillRecipe(cfg).setup()
    seen: list[dict] = []
    forward = recipe.student.forward_head if loss_impl == "fused_head" else recipe.student.forward

    def spy(batch, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(recipe.student._attention(batch))
        return forward(batch, *a, **k)

    setattr(recipe.student, "forward_head" if loss_impl == "fused_head" else "forward", spy)
    losses = recipe.train()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert seen and all(s["attention_mask"].ndim == 4 and "position_ids" in s for s in seen)
