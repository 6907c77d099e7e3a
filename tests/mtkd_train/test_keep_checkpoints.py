"""Only the newest `keep_checkpoints` checkpoints stay; files mtkd did not write are never touched."""

from __future__ import annotations

from pathlib import Path

from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe
from tests.mtkd_train._train_target import LMCache


def test_old_checkpoints_are_pruned_and_foreign_files_kept(lm_cache: LMCache, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(tmp_path),
                      batch_size=4, max_steps=5, checkpoint_every=1, keep_checkpoints=2, warmup_steps=0,
                      progress=False, num_workers=0)
    recipe = DistillRecipe(cfg).setup()
    recipe.train()
    recipe.close()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "step_00000004.pt", "step_00000005.pt"]


def test_a_fresh_run_starts_metrics_anew(lm_cache: LMCache, tmp_path: Path) -> None:
    """An earlier attempt in this folder died before its first checkpoint: no step is logged twice."""
    from tests.mtkd_train._train_target import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(tmp_path),
                      batch_size=4, max_steps=2, checkpoint_every=0, warmup_steps=0, progress=False, num_workers=0)
    recipe = DistillRecipe(cfg).setup()
    recipe.train()
    recipe.close()
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2] and all(r["loss"] != 9.0 for r in read_metrics(tmp_path))
