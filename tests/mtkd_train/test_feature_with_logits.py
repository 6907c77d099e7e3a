"""Features together with logits: relational kinds and optional projections in the KD recipe (mean aggregation of
several feature teachers: tests/mtkd_train/test_embed.py and losses/test_feature_kinds.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe
from tests.mtkd_train._train_target import LMCache, read_metrics


def _cfg(lm: LMCache, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"cache": str(lm.cache), "teachers": ("a", "b"), "student": str(lm.student), "out": str(out),
                            "batch_size": 4, "max_steps": 3, "checkpoint_every": 100, "lr": 3e-3, "warmup_steps": 0}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["similarity", "contrastive"])
def test_relational_feature_term_trains_beside_kd(lm_cache: LMCache, tmp_path: Path, kind: str) -> None:
    recipe = DistillRecipe(_cfg(lm_cache, tmp_path, features={"a": {"kind": kind, "projection": False}})).setup()
    recipe.train()
    records = read_metrics(tmp_path)
    assert all(math.isfinite(r["feat"]) and math.isfinite(r["kd"]) for r in records)
    assert recipe.objective.features is not None and recipe.objective.features.kind == kind
    assert not any(True for _ in recipe.objective.features.projections[0].parameters())  # identity: no projection

