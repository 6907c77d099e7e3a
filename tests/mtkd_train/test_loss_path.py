"""`loss_impl = auto` with a fusable head: timed once per run on the CPU, recorded, and taken back on --resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import mtkd_train.loss_path as loss_path
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.loss_path import CHOICE_FILE, choose_head_path
from tests.mtkd_train._train_target import LMCache

SIZES = {"positions": 64, "hidden_size": 8, "vocab": 300, "support": 20, "alpha": 0.5, "kernels": "eager"}


def _choose(out: Path, resume: bool = False, device: str = "cpu") -> str:
    return choose_head_path(out, resume=resume, rank=0, world=1, device=torch.device(device), **SIZES)


@pytest.fixture
def probe_all_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_path, "PROBE_LOGITS", (1, 1 << 40))


@pytest.fixture
def no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the paths were timed")

    monkeypatch.setattr(loss_path, "time_fused_paths", refuse)


@pytest.mark.usefixtures("no_timing")
def test_outside_the_probed_sizes_and_off_the_cpu_it_is_fused_head(tmp_path: Path) -> None:
    assert _choose(tmp_path) == "fused_head"  # 64 x 300 logits: below PROBE_LOGITS
    assert choose_head_path(tmp_path, resume=False, rank=0, world=1, device=torch.device("meta"),
                            **{**SIZES, "positions": 1 << 14}) == "fused_head"
    assert not (tmp_path / CHOICE_FILE).exists()


@pytest.mark.usefixtures("probe_all_sizes")
def test_the_timed_choice_is_recorded_with_its_timings(tmp_path: Path) -> None:
    choice = _choose(tmp_path / "run")
    record = json.loads((tmp_path / "run" / CHOICE_FILE).read_text())
    assert record["choice"] == choice in ("fused", "fused_head")
    assert record["fused_ms"] > 0 and record["fused_head_ms"] > 0 and record["positions"] == 64


@pytest.mark.usefixtures("probe_all_sizes", "no_timing")
def test_resume_takes_the_recorded_choice_without_timing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"choice": "fused"}))
    assert _choose(tmp_path, resume=True) == "fused"
    (tmp_path / CHOICE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="mtkd_train"):
        assert _choose(tmp_path, resume=True) == "fused_head"  # a run from before the record: auto was fused_head
    assert CHOICE_FILE in caplog.text


@pytest.mark.usefixtures("probe_all_sizes", "no_timing")
@pytest.mark.parametrize("text", ["{\"choice\": \"fast\"}", "not json", "[1, 2]"])
def test_a_bad_record_is_one_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / CHOICE_FILE).write_text(text)
    with pytest.raises(ConfigError, match=r"loss_impl\.json.*delete it to time the paths again, or pass --loss-impl"):
        _choose(tmp_path, resume=True)
    assert (tmp_path / CHOICE_FILE).read_text() == text  # nothing overwritten


@pytest.mark.usefixtures("probe_all_sizes")
def test_the_recipe_takes_the_choice_and_a_resume_keeps_it(lm_cache: LMCache, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mtkd_train.recipe import DistillRecipe

    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(tmp_path),
                      batch_size=2, max_steps=2, checkpoint_every=1, kernels="eager", progress=False)
    first = DistillRecipe(cfg).setup()
    choice = json.loads((tmp_path / CHOICE_FILE).read_text())["choice"]
    assert first.objective.head_fused == (choice == "fused_head")
    first.train()
    first.close()

    other = "fused" if choice == "fused_head" else "fused_head"  # a new timing would pick the other path
    monkeypatch.setattr(loss_path, "time_fused_paths", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"choice": other}))
    resumed = DistillRecipe(TrainConfig(**{**cfg.to_dict(), "max_steps": 3})).setup(resume=True)
    assert resumed.objective.head_fused == (other == "fused_head")
    resumed.close()
    explicit = DistillRecipe(TrainConfig(**{**cfg.to_dict(), "loss_impl": "fused_head",
                                            "out": str(tmp_path / "explicit")})).setup()
    assert explicit.objective.head_fused and not (tmp_path / "explicit" / CHOICE_FILE).exists()
    explicit.close()
