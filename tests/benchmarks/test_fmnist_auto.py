"""The Fashion-MNIST experiment's scoring helpers (benchmarks/quality/fmnist_auto.py), on tiny caches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.quality.fmnist_auto import (
    U8LOG_FLOOR,
    _configs,
    choose_auto,
    floor_as_zero,
    gate_stats,
    heldout,
    margins,
    spearman,
    target_scores,
)
from mtkd_cache import open_cache
from mtkd_train.scoring import HeldOut
from mtkd_train.targets import SparseTargets


def test_heldout_puts_each_images_domain_on_its_own_row(oracle_cache: Path) -> None:
    labels = open_cache(oracle_cache).samples.column("label").to_numpy()
    data = heldout(oracle_cache, ["far", "exact"], classes=labels)  # domain = the true class: rows must agree
    assert data.num_positions == len(labels) and data.domain_names[3] == "class3"
    assert torch.equal(data.domains, data.labels)
    with pytest.raises(ValueError, match="router classes"):
        heldout(oracle_cache, ["far", "exact"], classes=labels[:-1])


def test_choose_auto_writes_the_table_and_picks_the_exact_teacher(oracle_cache: Path, tmp_path: Path) -> None:
    record = choose_auto(heldout(oracle_cache, ["far", "exact"]), tmp_path / "choice.json")
    assert json.loads((tmp_path / "choice.json").read_text())["chosen"] == record["chosen"]
    kw = record["chosen"]["aggregate_kwargs"]
    weights = kw.get("weights") or kw.get("base_weights")
    assert weights is not None and weights[1] > 0.8
    assert [r["nll"] for r in record["ranked"]] == sorted(r["nll"] for r in record["ranked"])


def test_target_scores_rank_single_teachers_and_skip_the_gate(oracle_cache: Path) -> None:
    records = [{"method": m, "alpha": 0.9, "aggregate": a, "aggregate_kwargs": {}}
               for m, a in (("single:exact", "mean"), ("single:far", "mean"), ("mean", "mean"), ("gate", "gate"))]
    configs = _configs(records, ["far", "exact"])
    assert "gate" not in configs and configs["single:exact"] == ("mean", {"weights": [0.0, 1.0]})
    scores = target_scores(heldout(oracle_cache, ["far", "exact"]), configs)
    assert scores["single:exact"]["nll"] < scores["mean"]["nll"] < scores["single:far"]["nll"]


def test_floor_as_zero_makes_loglinear_fall_back_to_the_mean() -> None:
    # two "specialists" over 4 classes, each with the other's classes at the u8log floor
    idx = torch.arange(4).repeat(6, 1)
    own = torch.tensor([-0.7, -0.7, U8LOG_FLOOR, U8LOG_FLOOR])
    a = SparseTargets(idx, own.repeat(6, 1), torch.zeros(6))
    b = SparseTargets(idx, own.flip(0).repeat(6, 1), torch.zeros(6))
    data = HeldOut((a, b), torch.tensor([0, 1, 2, 3, 0, 2]), 4, teachers=("a", "b"))
    stored = target_scores(data, {"loglinear": ("loglinear", {}), "mean": ("mean", {})})
    zero = target_scores(floor_as_zero(data), {"loglinear": ("loglinear", {}), "mean": ("mean", {})})
    assert stored["loglinear"]["nll"] != pytest.approx(stored["mean"]["nll"], abs=1e-3)
    assert zero["loglinear"]["nll"] == pytest.approx(zero["mean"]["nll"], abs=1e-5)


def test_gate_stats_reads_share_and_entropy(tmp_path: Path) -> None:
    rows = [{"step": s, "gate_weights": [1.0, 0.0] if s < 15 else [0.5, 0.5], "gate_entropy": 0.0 if s < 15 else
             math.log(2), "gate_nll": 1.0} for s in range(0, 20, 5)] + [{"step": 20, "eval": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = gate_stats(tmp_path / "metrics.jsonl", 2)
    assert stats["all"]["share"] == [0.875, 0.125] and stats["late"]["share"] == [0.5, 0.5]
    assert stats["late"]["entropy"] == pytest.approx(math.log(2), abs=1e-4) == stats["max_entropy"]
    assert stats["logged_steps"] == 4
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "kd": 1.0}) + "\n")
    with pytest.raises(ValueError, match="gate_weights"):
        gate_stats(tmp_path / "metrics.jsonl", 2)


def test_margins_need_more_than_two_stds() -> None:
    def entry(mean: float, std: float) -> dict[str, dict[str, float]]:
        return {"test_acc": {"mean": mean, "std": std}}

    summary = {"no_kd": entry(0.80, 0.01), "mean": entry(0.60, 0.02), "a": entry(0.83, 0.01), "b": entry(0.815, 0.01)}
    res = margins(summary)
    assert res["a"]["no_kd"]["beats"] and res["a"]["mean"]["beats"]
    assert not res["b"]["no_kd"]["beats"] and res["b"]["mean"]["beats"]  # 1.5 pp < 2 x 1 pp
    assert res["a"]["no_kd"]["gain"] == pytest.approx(0.03) and "no_kd" not in res


def test_spearman_signs_and_small_samples() -> None:
    points = {m: {"x": float(i), "up": float(i) ** 2, "down": -float(i)} for i, m in enumerate("abcde")}
    res = spearman(points, "x", ("up", "down"))
    assert res["n"] == 5 and res["up"]["rho"] == 1.0 and res["down"]["rho"] == -1.0 and res["up"]["p"] < 0.05
    assert spearman({"a": points["a"], "b": points["b"]}, "x", ("up",))["up"]["rho"] is None
