"""Does scoring the target predict the student? (issue 13, part 2, on the language model.)

Every configuration of the student matrix trains on an aggregate of cached teachers. Its target is
scored on the held-out ``curve`` cache before any student exists (``score_operator``: the NLL of the
true next token at T = 1, the students' temperature), with the configuration's own options: library
defaults, the routing table, the choice ``auto`` logged in its run folder. All configurations are scored on
the same positions, those where Gemma (its own tokenization) is aligned, so single teachers, pairs and
all three compare. The learned gate is left out (its target depends on the trained network), and so is
no-KD (no target). The Spearman correlation of target NLL against student perplexity is then taken
over configurations, with the students' seed 0 and with the mean over their finished seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from examples.lm.students import ALL, RunSpec

__all__ = ["SKIP", "plot_points", "stored_targets", "student_points", "target_config", "target_points"]

SKIP = ("gate",)
"""Operators whose target is not a function of the cache (the gate is a trained network)."""


def target_config(spec: RunSpec, run_dir: Path, result: Mapping[str, Any] | None = None
                  ) -> tuple[str, dict[str, Any]]:
    """The operator and options `spec` trained on; for ``auto``, the choice made before step 0.

    That choice is read from the run's result JSON (``aggregate`` and ``aggregate_kwargs``), or, for
    results written before those were stored, from ``auto_aggregate.json`` in its run folder.
    """
    if spec.aggregate != "auto":
        return spec.aggregate, dict(spec.aggregate_kwargs)
    if result is not None and "aggregate_kwargs" in result:
        return result["aggregate"], dict(result["aggregate_kwargs"])
    path = run_dir / "auto_aggregate.json"
    if not path.is_file():
        raise FileNotFoundError(f"the choice of {spec.name} is neither in its result JSON nor in {path}; "
                                f"re-run {spec.name} (its result JSON then stores it)")
    chosen = json.loads(path.read_text())["chosen"]
    return chosen["aggregate"], dict(chosen.get("aggregate_kwargs", {}))


def target_points(curve_cache: str, configs: Mapping[str, tuple[Sequence[str], str, Mapping[str, Any]]],
                  *, teachers: Sequence[str] = ALL, max_positions: int = 80_000) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Held-out NLL, ECE and accuracy of each ``name -> (teachers, operator, options)`` target.

    The positions are read once for all teachers (so every target is scored on the same ones) and
    each configuration gets the subset of `teachers` it uses.
    """
    from mtkd_cache import open_cache
    from mtkd_train.scoring import HeldOut, collect_heldout, score_operator

    data = collect_heldout(open_cache(curve_cache), teachers, max_positions=max_positions)
    out = {}
    for name, (used, op, kwargs) in configs.items():
        idx = [list(teachers).index(t) for t in used]
        sub = HeldOut(tuple(data.targets[i] for i in idx), data.labels, data.vocab_size, data.domains,
                      data.domain_names, tuple(used), data.aligned)
        row = score_operator(sub, op, kwargs)
        out[name] = {"aggregate": op, "aggregate_kwargs": kwargs, "teachers": list(used), "nll": row.nll,
                     "ece": row.ece, "accuracy": row.accuracy}
    return out, {"positions": data.num_positions, "aligned": data.aligned, "max_positions": max_positions}


def stored_targets(path: Path, configs: Mapping[str, tuple[Sequence[str], str, Mapping[str, Any]]],
                   max_positions: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The target points of an earlier ``predict`` output (`path`), for `configs`, without the curve cache.

    A target does not depend on the students' seeds, so adding seeds needs no rescoring. Each config
    must be in `path` with the same teachers, operator and options (for ``auto``, the same choice), and
    scored with the same `max_positions`; otherwise the stored point is of another target and this raises.
    """
    data = json.loads(Path(path).read_text())
    info = dict(data.get("curve_cache", {}))
    scored_with = info.get("max_positions")
    if (scored_with is not None and scored_with != max_positions) or info.get("positions", 0) > max_positions:
        raise ValueError(f"{path} scored {info.get('positions')} positions (--max-positions {scored_with}), not "
                         f"--max-positions {max_positions}; pass the same --max-positions or leave out --targets")
    stored = data.get("points", {})
    out = {}
    for name, (used, op, kwargs) in configs.items():
        p = stored.get(name)
        key = None if p is None else (p.get("teachers"), p.get("aggregate"), p.get("aggregate_kwargs"))
        if p is None or key != (list(used), op, dict(kwargs)):
            found = "missing" if key is None else f"{key[1]} {key[2]} of {key[0]}"
            raise ValueError(f"{path}: the stored target of {name} is {found}, not {op} {dict(kwargs)} of "
                             f"{list(used)}; score it again (leave out --targets)")
        out[name] = {k: p[k] for k in ("aggregate", "aggregate_kwargs", "teachers", "nll", "ece", "accuracy")}
    return out, info


def student_points(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per KD configuration: overall held-out log-perplexity of seed 0 and the mean over its seeds."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        if r["spec"]["kd"] and r["spec"]["aggregate"] not in SKIP:
            by.setdefault(r["spec"]["name"], []).append(r)
    out = {}
    for name, rs in by.items():
        nll = [math.log(r["domains"]["overall"]["perplexity"]) for r in rs]
        s0 = [math.log(r["domains"]["overall"]["perplexity"]) for r in rs if r["seed"] == 0]
        out[name] = {"student_nll_mean": sum(nll) / len(nll), "seeds": len(nll),
                     **({"student_nll_s0": s0[0]} if s0 else {})}
    return out


def plot_points(points: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    """Student perplexity (mean over seeds) against target perplexity, one labelled point per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, p in points.items():
        x, y = math.exp(p["nll"]), math.exp(p["student_nll_mean"])
        ax.scatter(x, y, s=30, edgecolor="black", color="tab:blue" if len(p["teachers"]) > 1 else "tab:orange",
                   zorder=3)
        ax.annotate(f"{name} ({p['seeds']})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="target perplexity on held-out positions (before training)",
           ylabel="student held-out perplexity (mean over seeds)",
           title="does scoring the target predict the student? (orange: one teacher)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
