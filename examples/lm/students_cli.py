"""Subcommands ``caches``, ``scores``, ``students``, ``report`` and ``predict`` of ``python -m examples.lm``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from examples.lm.caches import CACHE_SPLITS, TEACHERS, cache_data
from examples.lm.domains import DOMAINS
from examples.lm.students import (
    ALL,
    SHORT,
    Recipe,
    RunSpec,
    base_runs,
    curve_runs,
    mean_spec,
    operator_runs,
    run_matrix,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PHASES = ("base", "seeds", "operators", "curve")
CROSS_TOKENIZER = ("smollm2", "gemma3", "mean-smollm2+gemma3")
"""Issue 10's item 4: each generalist alone and both (different tokenizers)."""
SUFFIX = click.option("--suffix", default="", show_default=True,
                      help="Appended to the names of the files written in benchmarks/results (one per recipe, "
                           "e.g. _450st).")


def work() -> Path:
    return Path(os.environ.get("MTKD_LM_WORK", "runs/lm"))


@click.command()
def caches() -> None:
    """Write the transfer/eval/curve JSONL files and prepare their caches with SmolLM2's tokenizer.

    The teachers are then cached one at a time with `mtkd-cache run` (printed here).
    """
    w = work()
    for name in CACHE_SPLITS:
        data = cache_data(w / "data", name)
        subprocess.run([sys.executable, "-m", "mtkd_cache.cli", "prepare", str(w / "caches" / name), "--data",
                        str(data), "--tokenizer", str(w / "models" / "smollm2"), "--max-length", "512",
                        "--domain-column", "domain"], check=True)
    for cache in ("transfer", "curve"):
        for t in TEACHERS:
            click.echo(f"mtkd-cache run {w / 'caches' / cache} --teacher {t} --model {w / 'models' / t} --top-k 64")


@click.command()
@click.option("--cache", "cache_name", type=click.Choice(sorted(CACHE_SPLITS)), default="curve", show_default=True,
              help="Held-out cache whose cached teachers are scored (the teachers are run on it).")
@click.option("--max-positions", type=int, default=80_000, show_default=True, help="Held-out positions scored.")
def scores(cache_name: str, max_positions: int) -> None:
    """`mtkd-score` of every operator on a held-out cache: all teachers, and each pair.

    A set with Gemma (its own tokens and vocabulary) is scored where Gemma is aligned; the positions
    scored and that share are stored with the ranking. A set `mtkd-score` refuses is recorded with
    the refusal instead of a ranking.
    """
    from mtkd_train.scoring import score_cache

    sets = [ALL, ("smollm2", "gemma3"), ("smollm2", "smollm2-shakespeare"), ("gemma3", "smollm2-shakespeare")]
    out: dict[str, Any] = {}
    for teachers in sets:
        try:
            info: dict[str, Any] = {}
            rows, chosen = score_cache(str(work() / "caches" / cache_name), teachers, max_positions=max_positions,
                                       heldout_info=info)
        except ValueError as e:  # e.g. no held-out position where every cross-tokenizer teacher is aligned
            out["+".join(teachers)] = {"error": f"{type(e).__name__}: {e}"}
            click.echo(f"{'+'.join(teachers)}: refused: {e}")
            continue
        out["+".join(teachers)] = {"chosen": chosen, "ranked": [r.to_dict() for r in rows], **info}
        click.echo(f"{'+'.join(teachers)}: chosen {json.dumps(chosen)}; {info['positions']} positions scored, "
                   f"{100 * float(info['aligned']):.1f}% of those read (Gemma: where it is aligned)")
        for r in rows:
            click.echo(f"  {r.aggregate:<12} nll {r.nll:.4f} ppl {r.to_dict()['perplexity']:9.3f} {r.note}")
    _write(RESULTS / "lm_scores.json", {"cache": cache_name, "max_positions": max_positions, "sets": out})


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def best_route() -> dict[str, str]:
    """Each domain to the teacher of lowest held-out bits per byte (``lm_teachers.json``), SmolLM2 by default."""
    path = RESULTS / "lm_teachers.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    route = {}
    for d in DOMAINS:
        scored = {t: table[f"{t}/{d}"]["bits_per_byte"] for t in ALL if f"{t}/{d}" in table}
        route[d] = min(scored, key=scored.__getitem__) if scored else "smollm2"
    return route


def single_teacher_ppl(root: Path) -> dict[str, float]:
    """Overall held-out perplexity of each single-teacher student, mean over its finished seeds."""
    from examples.lm.report import aggregate, load_results

    rows = aggregate(load_results(root))
    return {r["spec"]["teachers"][0]: r["overall"]["mean"] for r in rows.values()
            if r["spec"]["kd"] and len(r["spec"]["teachers"]) == 1}


def matrix(phases: tuple[str, ...], seeds: list[int], root: Path) -> list[tuple[RunSpec, int]]:
    """The runs of `phases`, in the order of the experiment: base s0, base other seeds, operators, curve."""
    runs: list[tuple[RunSpec, int]] = []
    if "base" in phases:
        runs += [(s, seeds[0]) for s in base_runs()]
    if "seeds" in phases:
        runs += [(s, seed) for seed in seeds[1:] for s in base_runs()]
    if "operators" in phases:
        runs += [(s, seed) for seed in seeds for s in operator_runs(best_route())]
    if "curve" in phases:
        known = {s.name for s in base_runs()}
        runs += [(s, seed) for seed in seeds for s in curve_runs(single_teacher_ppl(root)) if s.name not in known]
    return runs


@click.command()
@click.option("--phase", "phases", multiple=True, type=click.Choice(PHASES), default=PHASES, show_default=True,
              help="Parts of the matrix to run (repeat); finished (config, seed) runs are skipped.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--only", multiple=True, help="Run only these configs (by name, repeat).")
@click.option("--steps", type=int, default=Recipe.steps, show_default=True, help="Optimizer steps per run.")
@click.option("--layers", type=int, default=Recipe.layers, show_default=True, help="Student blocks.")
@click.option("--width", type=int, default=Recipe.width, show_default=True, help="Student hidden size.")
@click.option("--lr", type=float, default=Recipe.lr, show_default=True, help="Peak learning rate.")
@click.option("--alpha", type=float, default=Recipe.alpha, show_default=True, help="KD weight of KD runs.")
@click.option("--eval-every", type=int, default=Recipe.eval_every, show_default=True, help="Steps between evals.")
def students(phases: tuple[str, ...], seeds: str, only: tuple[str, ...], steps: int, layers: int, width: int,
             lr: float, alpha: float, eval_every: int) -> None:
    """Train the student matrix on the transfer cache; one result JSON per (config, seed), resumable."""
    from examples.lm.student_eval import train_student
    from examples.lm.students import write_student_config

    w = work()
    recipe = Recipe(layers=layers, width=width, steps=steps, lr=lr, alpha=alpha, eval_every=eval_every)
    root = w / "students" / f"L{layers}w{width}-{steps}st-lr{lr:g}-a{alpha:g}"
    student = write_student_config(root / "student-config", recipe, w / "models" / "smollm2")
    caches_ = w / "caches"
    trainer = partial(train_student, cache=str(caches_ / "transfer"), curve_cache=str(caches_ / "curve"),
                      eval_cache=str(caches_ / "eval"), student=student)
    runs = [(s, seed) for s, seed in matrix(phases, [int(x) for x in seeds.split(",")], root)
            if not only or s.name in only]
    run_matrix(root, runs, recipe, trainer, log=click.echo)
    click.echo(f"results under {root}; summarise with `python -m examples.lm report --root {root}`")


@click.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The results folder of one recipe (printed by `students`).")
@SUFFIX
def report(root: Path, suffix: str) -> None:
    """Mean ± std over seeds per config and domain: lm_students.json, a Markdown table, lm_curve.png."""
    from examples.lm.report import (
        aggregate,
        goal,
        load_results,
        plot_curves,
        ranking_stability,
        table,
    )

    results = load_results(root)
    rows = aggregate(results)
    click.echo(table(rows, list(DOMAINS)))
    verdict = goal(rows, results)
    if verdict is not None:
        click.echo(f"goal ({verdict['best_multi']} vs {verdict['best_single']}): margin {verdict['margin']:.3f} "
                   f"vs 2 std {verdict['two_std']:.3f}, paired {verdict['paired_margin_by_seed']}, "
                   f"worst domain {verdict['multi_worst']['mean']:.2f} vs {verdict['single_worst']['mean']:.2f}: "
                   f"{'met' if verdict['met'] else 'NOT met'}")
    stability = {"issue 10 (each generalist alone and both)": ranking_stability(results, CROSS_TOKENIZER),
                 "every config run on the most seeds": ranking_stability(
                     results, sorted(n for n, r in rows.items() if len(r["seeds"]) == max(len(x["seeds"]) for x in rows.values())))}
    for label, st in stability.items():
        if st is not None:
            click.echo(f"ranking, {label}, seeds {st['seeds']}: {' < '.join(st['final_ranking'])}; the curve's "
                       f"ranking is unchanged since step {st['stable_since']} of {st['last_step']}"
                       f"{'' if st['final_agrees'] else ' (the full held-out set ranks otherwise)'}; "
                       f"per seed: {st['pairs_by_seed']}")
    best = sorted(ALL, key=lambda t: single_teacher_ppl(root).get(t, float("inf")))
    orders = {"fixed order (" + ", ".join(ALL) + ")": _order_names(ALL),
              "best first (" + ", ".join(best) + ")": _order_names(tuple(best))}
    _write(RESULTS / f"lm_students{suffix}.json", {"root": str(root), "rows": rows, "orders": orders, "goal": verdict,
                                                   "ranking_stability": stability,
                                          "runs": [{k: r[k] for k in ("spec", "seed", "domains", "curve",
                                                                      "train_seconds")} for r in results]})
    plot_curves(results, rows, RESULTS / f"lm_curve{suffix}.png", orders)


def _order_names(order: tuple[str, ...]) -> list[str]:
    """The configs of the 1 -> N curve in `order`: no KD, the first teacher alone, then the mean of the first n."""
    return ["nokd", SHORT[order[0]], *(mean_spec(order[:n]).name for n in range(2, len(order) + 1))]


@click.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The results folder of one recipe (printed by `students`).")
@click.option("--max-positions", type=int, default=80_000, show_default=True,
              help="Held-out positions of the curve cache scored.")
@click.option("--targets", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Reuse the target points of an earlier lm_predict*.json instead of scoring the curve cache "
                   "(for more seeds of the same configs; a changed config is refused).")
@SUFFIX
def predict(root: Path, max_positions: int, targets: Path | None, suffix: str) -> None:
    """Spearman of each config's target NLL (held-out, before training) against its student's perplexity."""
    from benchmarks.quality.fmnist_auto import spearman
    from examples.lm.predict import (
        plot_points,
        stored_targets,
        student_points,
        target_config,
        target_points,
    )
    from examples.lm.report import load_results

    results = load_results(root)
    students_ = student_points(results)
    first: dict[str, dict[str, Any]] = {}  # each config's lowest seed: its auto choice is read from there
    for r in sorted(results, key=lambda r: r["seed"]):
        if r["spec"]["name"] in students_:
            first.setdefault(r["spec"]["name"], r)
    configs = {}
    for name, r in first.items():
        s = r["spec"]
        spec = RunSpec(s["name"], tuple(s["teachers"]), s["aggregate"], s["aggregate_kwargs"], s["kd"])
        configs[name] = (spec.teachers, *target_config(spec, root / "runs" / f"{name}-s{r['seed']}", r))
    scored, info = (stored_targets(targets, configs, max_positions) if targets is not None
                    else target_points(str(work() / "caches" / "curve"), configs, max_positions=max_positions))
    points = {n: {**scored[n], **students_[n]} for n in configs}
    with_s0 = {n: p for n, p in points.items() if "student_nll_s0" in p}
    rho = {"seed0": spearman(with_s0, "nll", ("student_nll_s0",)),
           "seed_mean": spearman(points, "nll", ("student_nll_mean",)),
           "multi_teacher_only_seed0": spearman({n: p for n, p in with_s0.items() if len(p["teachers"]) > 1},
                                                "nll", ("student_nll_s0",))}
    click.echo(f"{'config':28s} {'target ppl':>10s} {'student ppl s0':>14s} {'mean ppl':>9s} seeds")
    for n, p in sorted(points.items(), key=lambda kv: kv[1]["nll"]):
        s0 = f"{math.exp(p['student_nll_s0']):14.1f}" if "student_nll_s0" in p else f"{'-':>14s}"
        click.echo(f"{n:28s} {math.exp(p['nll']):10.2f} {s0} "
                   f"{math.exp(p['student_nll_mean']):9.1f} {p['seeds']}")
    for k, r in rho.items():
        y = next(key for key in r if key.startswith("student"))
        click.echo(f"spearman {k} (n = {r['n']}): rho {r[y]['rho']}, p {r[y]['p']}")
    _write(RESULTS / f"lm_predict{suffix}.json", {"root": str(root), "curve_cache": info, "points": points, "spearman": rho,
                                                  **({"targets_from": str(targets)} if targets else {})})
    plot_points(points, RESULTS / f"lm_predict{suffix}.png")
