"""`aggregate = "auto"` chooses an operator from held-out cached positions before step 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.recipe import DistillRecipe
from mtkd_train.scoring import score_cache
from tests.mtkd_train._train_target import LMCache, read_metrics


def _cfg(lm: LMCache, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {"cache": str(lm.cache), "teachers": ("a", "b"), "student": str(lm.student),
                               "out": str(out), "batch_size": 4, "max_steps": 2, "checkpoint_every": 100,
                               "lr": 3e-3, "warmup_steps": 0}
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_auto_uses_the_operator_mtkd_score_chooses_and_trains(lm_cache: LMCache, tmp_path: Path) -> None:
    recipe = DistillRecipe(_cfg(lm_cache, tmp_path, aggregate="auto")).setup()
    _, chosen = score_cache(str(lm_cache.cache), ["a", "b"])
    assert (recipe.aggregate, recipe.aggregate_kwargs) == (chosen["aggregate"], chosen["aggregate_kwargs"])
    assert recipe.aggregate != "auto" and recipe.objective.aggregate_name == recipe.aggregate
    record = json.loads((tmp_path / "auto_aggregate.json").read_text())
    assert record["chosen"] == chosen and record["ranked"][0]["nll"] <= record["ranked"][-1]["nll"]
    recipe.train()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_auto_with_options_is_refused() -> None:
    with pytest.raises(ConfigError, match="auto chooses the options itself"):
        TrainConfig(cache="c", teachers=("a",), student="s", aggregate="auto", aggregate_kwargs={"tau": 1.0})
