"""`loss_impl = auto` with a fusable head: timed once per run on the CPU, recorded, and taken back on --resume;
under DDP every rank takes rank 0's choice, or stops with rank 0's error."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtkd_train.loss_path as loss_path
from mtkd_train.checkpoint import CheckpointError
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.loss_path import CHOICE_FILE, choose_head_path
from tests.mtkd_train._train_target import LMCache
from tests.mtkd_train.test_shared import _free_port

SIZES = {"positions": 64, "seq_len": 17, "hidden_size": 8, "head_rows": 300, "vocab": 300, "support": 20,
         "alpha": 0.5, "kernels": "eager"}
BAD = "records loss_impl .*restore the file, or write .*\"choice\": \"fused\".* into it"


def _choose(out: Path, resume: bool = False, device: str = "cpu", rank: int = 0, world: int = 1) -> str:
    return choose_head_path(out, resume=resume, rank=rank, world=world, device=torch.device(device), **SIZES)


def _record(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / CHOICE_FILE).read_text()))


@pytest.fixture
def probe_all_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_path, "PROBE_LOGITS", (1, 1 << 40))


@pytest.fixture
def no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the paths were timed")

    monkeypatch.setattr(loss_path, "time_fused_paths", refuse)


@pytest.mark.usefixtures("no_timing")
def test_outside_the_probed_sizes_and_off_the_cpu_it_is_fused_head_and_recorded(tmp_path: Path) -> None:
    assert _choose(tmp_path / "small") == "fused_head"  # 64 x 300 logits: below PROBE_LOGITS
    assert _record(tmp_path / "small") == {"choice": "fused_head", "timed": False, "positions": 64, "head_rows": 300,
                                           "device": "cpu"}
    assert _choose(tmp_path / "meta", device="meta") == "fused_head"
    assert _record(tmp_path / "meta")["device"] == "meta"


@pytest.mark.usefixtures("probe_all_sizes")
def test_the_timed_choice_is_recorded_with_its_timings(tmp_path: Path) -> None:
    choice = _choose(tmp_path / "run")
    record = _record(tmp_path / "run")
    assert record["choice"] == choice in ("fused", "fused_head") and record["timed"] is True
    assert record["fused_ms"] > 0 and record["fused_head_ms"] > 0 and record["timed_rows"] == 64


@pytest.mark.usefixtures("probe_all_sizes", "no_timing")
def test_resume_takes_the_recorded_choice_on_any_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"choice": "fused"}))
    assert _choose(tmp_path, resume=True) == "fused"
    assert _choose(tmp_path, resume=True, device="meta") == "fused"  # resumed elsewhere: the same path
    (tmp_path / CHOICE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="mtkd_train"):
        assert _choose(tmp_path, resume=True) == "fused_head"  # a run from before the record: auto was fused_head
    assert CHOICE_FILE in caplog.text and not (tmp_path / CHOICE_FILE).exists()


@pytest.mark.usefixtures("probe_all_sizes", "no_timing")
@pytest.mark.parametrize("text", ["{\"choice\": \"fast\"}", "not json", "[1, 2]"])
def test_a_bad_record_is_one_clear_error_and_is_kept(tmp_path: Path, text: str) -> None:
    (tmp_path / CHOICE_FILE).write_text(text)
    with pytest.raises(ConfigError, match=BAD):
        _choose(tmp_path, resume=True)
    assert (tmp_path / CHOICE_FILE).read_text() == text


def _rank(rank: int, port: int, out: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loss_path.PROBE_LOGITS = (1, 1 << 40)
    outcomes = []
    try:
        for resume in (False, True):
            try:
                outcomes.append(_choose(Path(out), resume=resume, rank=rank, world=2))
            except ConfigError as e:
                outcomes.append(f"ConfigError: {e}")
            if rank == 0 and not resume:
                (Path(out) / CHOICE_FILE).write_text("not json")  # the resume then finds a bad record
            dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(f"{result}.{rank}").write_text(json.dumps(outcomes))


def test_ddp_ranks_take_rank_0s_choice_and_stop_on_its_error(tmp_path: Path) -> None:
    result = str(tmp_path / "result")
    mp.spawn(_rank, args=(_free_port(), str(tmp_path / "run"), result), nprocs=2, join=True)
    (chose0, bad0), (chose1, bad1) = (json.loads(Path(f"{result}.{r}").read_text()) for r in range(2))
    assert chose0 == chose1 in ("fused", "fused_head")
    assert bad0 == bad1 and bad0.startswith("ConfigError:") and "restore the file" in bad0


@pytest.mark.usefixtures("probe_all_sizes")
def test_the_recipe_takes_the_choice_and_a_resume_keeps_it(lm_cache: LMCache, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mtkd_train.recipe import DistillRecipe

    cfg = TrainConfig(cache=str(lm_cache.cache), teachers=("a", "b"), student=str(lm_cache.student), out=str(tmp_path),
                      batch_size=2, max_steps=2, checkpoint_every=1, kernels="eager", progress=False)
    first = DistillRecipe(cfg).setup()
    choice = _record(tmp_path)["choice"]
    assert first.objective.head_fused == (choice == "fused_head")
    first.train()
    first.close()

    other = "fused" if choice == "fused_head" else "fused_head"  # a new timing would have to pick the other path
    monkeypatch.setattr(loss_path, "time_fused_paths", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"choice": other}))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):  # a fresh run there writes nothing
        DistillRecipe(cfg).setup()
    assert _record(tmp_path) == {"choice": other}
    resumed = DistillRecipe(TrainConfig(**{**cfg.to_dict(), "max_steps": 3})).setup(resume=True)
    assert resumed.objective.head_fused == (other == "fused_head")
    resumed.close()
    explicit = DistillRecipe(TrainConfig(**{**cfg.to_dict(), "loss_impl": "fused_head",
                                            "out": str(tmp_path / "explicit")})).setup()
    assert explicit.objective.head_fused and not (tmp_path / "explicit" / CHOICE_FILE).exists()
    explicit.close()
