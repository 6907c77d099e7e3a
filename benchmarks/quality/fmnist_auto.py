"""Choosing the operator from the cache in the Fashion-MNIST experiment (issue 13, parts 2 and 3).

- :func:`heldout` reads the val cache's teachers (`mtkd_train.scoring.collect_heldout`) and, when
  given, attaches a per-image domain (the seed's no-KD router's predicted class, so no val label is
  used to route), named ``class<c>`` like the transfer cache's domains.
- :func:`choose_auto` is what ``mtkd-train --aggregate auto`` does (`rank_operators` + `choose`),
  on val instead of the experiment's eval cache (the test split, which must stay unseen).
- :func:`target_scores` scores each trained configuration's aggregate on val (held-out NLL of the
  true class at T = 1, ECE, accuracy): the x axis of the Spearman correlation.
- :func:`gate_stats` reads the learned gate's weights and entropy from a run's metrics.jsonl.
- :func:`spearman` correlates target NLL with the students' test accuracy and NLL across operators.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mtkd_cache import open_cache
from mtkd_train.scoring import HeldOut, choose, collect_heldout, rank_operators, score_operator
from mtkd_train.targets import SparseTargets

__all__ = ["choose_auto", "floor_as_zero", "gate_stats", "heldout", "margins", "spearman", "target_scores"]

NUM_CLASSES = 10
#: the lowest finite u8log value (code 254 at step 1/16); code 255 is an exact zero
U8LOG_FLOOR = -254 / 16


def heldout(val_cache: Path, teachers: Sequence[str], classes: np.ndarray | None = None) -> HeldOut:
    """Every labelled val image of `teachers`, with domain ``class<classes[i]>`` when `classes` is given."""
    reader = open_cache(val_cache)
    data = collect_heldout(reader, teachers, max_positions=1_000_000, chunks=range(reader.num_chunks))
    if classes is None:
        return data
    if len(classes) != data.num_positions:
        raise ValueError(f"{len(classes)} router classes for {data.num_positions} labelled images of {val_cache}")
    codes = torch.from_numpy(np.asarray(classes).astype(np.int64))
    return dataclasses.replace(data, domains=codes, domain_names=tuple(f"class{c}" for c in range(NUM_CLASSES)))


def floor_as_zero(data: HeldOut, floor: float = U8LOG_FLOOR) -> HeldOut:
    """`data` with every stored value at the u8log floor read as an exact zero (log p = -inf).

    A teacher's finite log p below the floor (a specialist's unseen class, logit -1e4) is stored at
    the floor, not as the exact zero code: this is the target the exact-zero code would give.
    """
    def zero(t: SparseTargets) -> SparseTargets:
        return SparseTargets(t.indices, t.logp.masked_fill(t.logp <= floor, -math.inf), t.tail)

    return dataclasses.replace(data, targets=tuple(zero(t) for t in data.targets))


def choose_auto(data: HeldOut, out: Path) -> dict[str, Any]:
    """Rank every operator on `data`, write the table to `out` (JSON), return the chosen config keys."""
    rows = rank_operators(data)
    chosen = choose(rows, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"chosen": chosen, "positions": data.num_positions, "domains": data.domains is not None,
              "ranked": [r.to_dict() for r in rows]}
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def target_scores(data: HeldOut, configs: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Held-out NLL, ECE and accuracy of each ``method -> (aggregate, kwargs)`` target on `data`."""
    out = {}
    for method, (name, kwargs) in configs.items():
        row = score_operator(data, name, kwargs)
        out[method] = {"nll": row.nll, "ece": row.ece, "accuracy": row.accuracy, "mean_weights": row.mean_weights}
    return out


def gate_stats(metrics: Path, num_teachers: int) -> dict[str, Any]:
    """The gate's per-teacher share and weight entropy (nats; uniform = ln N), over the run and at its end.

    ``late`` averages the last quarter of the logged steps; ``entropy_of_share`` is the entropy of the
    mean weights (low = one teacher gets everything on average) and ``entropy`` the mean per-sample
    entropy (low = each sample goes to one teacher).
    """
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "gate_weights" in r]
    if not rows:
        raise ValueError(f"{metrics} logs no gate_weights; is this a gate run?")
    late = rows[len(rows) - max(1, len(rows) // 4):]

    def part(rs: list[dict[str, Any]]) -> dict[str, Any]:
        share = np.mean([r["gate_weights"] for r in rs], axis=0)
        return {"share": share.round(4).tolist(), "entropy": round(float(np.mean([r["gate_entropy"] for r in rs])), 4),
                "entropy_of_share": round(float(-(share * np.log(np.clip(share, 1e-30, None))).sum()), 4),
                "gate_nll": round(float(np.mean([r["gate_nll"] for r in rs])), 4)}

    return {"all": part(rows), "late": part(late), "max_entropy": round(math.log(num_teachers), 4),
            "logged_steps": len(rows)}


def spearman(points: Mapping[str, Mapping[str, float]], x: str, ys: Sequence[str]) -> dict[str, Any]:
    """Spearman rho (and two-sided p) of ``points[m][x]`` against each ``points[m][y]`` over methods m."""
    methods = sorted(points)
    out: dict[str, Any] = {"methods": methods, "n": len(methods)}
    for y in ys:
        if len(methods) < 3:
            out[y] = {"rho": None, "p": None}
            continue
        res = stats.spearmanr([points[m][x] for m in methods], [points[m][y] for m in methods])
        out[y] = {"rho": round(float(res.statistic), 4), "p": round(float(res.pvalue), 4)}
    return out


def margins(summary: Mapping[str, Mapping[str, Any]], refs: Sequence[str] = ("no_kd", "mean")) -> dict[str, Any]:
    """Each method's test-accuracy gain over each of `refs`, in units of the larger of the two stds.

    ``beats`` holds when the gain exceeds 2 x that std (the issue's "more than 2 std"); ``z_pooled`` is
    the gain over sqrt(std_a^2 + std_b^2), for reference.
    """
    out: dict[str, Any] = {}
    for m, s in summary.items():
        if m in refs or m == "best_single":
            continue
        row = {}
        for ref in refs:
            if ref not in summary:
                continue
            a, b = s["test_acc"], summary[ref]["test_acc"]
            gain, big = a["mean"] - b["mean"], max(a["std"], b["std"])
            row[ref] = {"gain": round(gain, 5), "std": round(big, 5),
                        "z_pooled": round(gain / math.hypot(a["std"], b["std"]), 2) if a["std"] or b["std"] else None,
                        "beats": bool(gain > 2 * big)}
        out[m] = row
    return out


def _configs(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """``method -> (aggregate, kwargs)`` over `names` for each KD run (a single teacher = one-hot `mean`)."""
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for r in records:
        if not r["alpha"] or r["aggregate"] == "gate":
            continue  # the gate's target depends on the trained network: no static target to score
        if r["method"].startswith("single:"):
            t = r["method"].removeprefix("single:")
            out[r["method"]] = ("mean", {"weights": [float(n == t) for n in names]})
        else:
            out[r["method"]] = (r["aggregate"], r.get("aggregate_kwargs") or {})
    return out


def scoring_report(out: Path, val_cache: Path, seeds: Sequence[int], records: Sequence[Mapping[str, Any]],
                   summary: Mapping[str, Mapping[str, Any]], teachers: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Per regime: each trained target's val score per seed, the auto choices, the gate statistics and the
    Spearman correlations of target NLL (mean over seeds) with the students' test accuracy and NLL."""
    report: dict[str, Any] = {}
    for regime, names in teachers.items():
        scores: dict[str, Any] = {}
        for seed in seeds:
            rows = [r for r in records if r["regime"] == regime and r["seed"] == seed]
            router_val = out / "runs" / f"s{seed}" / "router_val.npy"
            if rows and router_val.is_file():
                data = heldout(val_cache, names, np.load(router_val))
                scores[str(seed)] = target_scores(data, _configs(rows, names))
        nll: dict[str, list[float]] = {}
        for per_seed in scores.values():
            for method, s in per_seed.items():
                nll.setdefault(method, []).append(s["nll"])
        points = {m: {"target_nll": float(np.mean(v)), "test_acc": summary[regime][m]["test_acc"]["mean"],
                      "test_nll": summary[regime][m]["test_nll"]["mean"]} for m, v in nll.items()}
        ops = {m: p for m, p in points.items() if not m.startswith(("single:", "cand:"))}
        configs = {m: p for m, p in points.items() if not m.startswith("single:")}
        zero = floor_as_zero(heldout(val_cache, names))
        report[regime] = {
            "target_scores": scores, "points": points,
            "floor_as_exact_zero": target_scores(zero, {"loglinear": ("loglinear", {}), "mean": ("mean", {})}),
            "margins": margins(summary[regime]),
            "spearman_operators": spearman(ops, "target_nll", ("test_acc", "test_nll")),
            "spearman_operators_without_label_aware": spearman(
                {m: p for m, p in ops.items() if m != "label_aware"}, "target_nll", ("test_acc", "test_nll")),
            "spearman_with_candidates": spearman(configs, "target_nll", ("test_acc", "test_nll")),
            "spearman_with_single_teachers": spearman(points, "target_nll", ("test_acc", "test_nll")),
            "auto": {f"{m}_s{seed}": json.loads(f.read_text()) for seed in seeds for m in ("auto", "auto_global")
                     if (f := out / "runs" / f"s{seed}" / regime / f"{m}_choice.json").is_file()},
            "gate": [{"seed": r["seed"], **r["gate"]} for r in records
                     if r["regime"] == regime and r.get("gate")],
        }
    return report
