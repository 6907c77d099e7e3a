"""Plots and Markdown tables of the Fashion-MNIST multi-teacher experiment (`fmnist_experiment`).

    python -m benchmarks.quality.plot_fmnist benchmarks/results/fmnist_results.json

Reads the results JSON only (no training, no cache). One figure per regime,
``fmnist_<regime>.png``: test accuracy and test ECE per method, mean over seeds with a +-1 std error
bar and the seeds as dots; the no-KD and best-single-teacher means are dashed reference lines.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["auto_markdown", "gate_markdown", "method_order", "plot_results", "plot_scoring", "print_tables",
           "scoring_markdown", "table_markdown"]

_COLOURS = {"baseline": "#9e9e9e", "single": "#90caf9", "best": "#1565c0", "operator": "#ef6c00", "candidate": "#ffcc80"}


def method_order(summary: Mapping[str, Any]) -> list[str]:
    """Baselines, best single, operators, then the other single teachers."""
    operators = [m for m in summary if m not in ("no_kd", "no_kd_transfer", "best_single")
                 and not m.startswith(("single:", "cand:"))]  # candidates: in the scoring table and plot only
    singles = [m for m in summary if m.startswith("single:")]
    return [m for m in ("no_kd", "no_kd_transfer", "best_single") if m in summary] + operators + singles


def _label(method: str, summary: Mapping[str, Any]) -> str:
    if method == "best_single":
        return f"best single\n({summary['best_single']['teacher']})"
    return method.replace("single:", "only ").replace("no_kd_transfer", "no KD\n(KD schedule)").replace(
        "no_kd", "no KD")


def _colour(method: str) -> str:
    if method.startswith("no_kd"):
        return _COLOURS["baseline"]
    if method == "best_single":
        return _COLOURS["best"]
    if method.startswith("cand:"):
        return _COLOURS["candidate"]
    return _COLOURS["single"] if method.startswith("single:") else _COLOURS["operator"]


def _runs_of(report: Mapping[str, Any], regime: str, method: str) -> list[dict[str, Any]]:
    summary = report["summary"][regime]
    if method == "best_single":
        method = "single:" + summary["best_single"]["teacher"]
    return [r for r in report["runs"] if r["regime"] in (regime, "shared") and r["method"] == method]


def plot_results(results_json: Path, out_dir: Path) -> list[Path]:
    """Write ``fmnist_<regime>.png`` for every regime in the results; return the paths."""
    report = json.loads(Path(results_json).read_text())
    paths = []
    for regime, summary in report["summary"].items():
        methods = method_order(summary)
        fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
        for ax, key, name in ((axes[0], "test_acc", "test accuracy"), (axes[1], "test_ece", "test ECE")):
            means = [summary[m][key]["mean"] for m in methods]
            stds = [summary[m][key]["std"] for m in methods]
            xs = range(len(methods))
            ax.bar(xs, means, yerr=stds, capsize=3, color=[_colour(m) for m in methods], edgecolor="black",
                   linewidth=0.4)
            for i, m in enumerate(methods):
                vals = [r[key] for r in _runs_of(report, regime, m)]
                ax.scatter([i] * len(vals), vals, s=8, color="black", zorder=3)
            for ref, style in (("no_kd", "--"), ("best_single", ":")):
                if ref not in summary:
                    continue
                ax.axhline(summary[ref][key]["mean"], color="black", linestyle=style, linewidth=0.8,
                           label=f"{_label(ref, summary).replace(chr(10), ' ')} mean")
            ax.set_ylabel(name)
            if key == "test_acc":
                low = min(m - s for m, s in zip(means, stds))
                ax.set_ylim(max(0.0, low - 0.03), min(1.0, max(means) + 0.02))
                ax.legend(loc="lower right", fontsize=8)
        axes[1].set_xticks(range(len(methods)), [_label(m, summary) for m in methods], rotation=45, ha="right",
                           fontsize=8)
        seeds = len(summary["no_kd"]["seeds"])
        fig.suptitle(f"Fashion-MNIST, {regime}: 784-128-10 student, 1,000 labels + 30,000 soft labels "
                     f"(mean ± std over {seeds} seeds; dots = seeds)", fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / f"fmnist_{regime}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if report.get("scoring"):
        paths.append(plot_scoring(report, Path(out_dir)))
    return paths


def plot_scoring(report: Mapping[str, Any], out_dir: Path) -> Path:
    """``fmnist_scoring.png``: per regime, each target's held-out (val) NLL against the student's test accuracy."""
    regimes = list(report["scoring"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.8))
    for ax, regime in zip(np.atleast_1d(axes), regimes):
        sc = report["scoring"][regime]
        for m, p in sc["points"].items():
            single = m.startswith("single:")
            ax.scatter(p["target_nll"], 100 * p["test_acc"], color=_colour(m), edgecolor="black", s=30, zorder=3)
            name = m.replace("single:", "only ").replace("cand:", "").replace("_EM_base_weights", ", EM")
            ax.annotate(name, (p["target_nll"], 100 * p["test_acc"]), fontsize=6,
                        xytext=(3, 3 if not single else -8), textcoords="offset points")
        rho = sc["spearman_operators"]
        acc = rho.get("test_acc", {})
        ax.set_title(f"{regime}: operators n = {rho['n']}, Spearman rho(target NLL, acc) = {acc.get('rho')} "
                     f"(p = {acc.get('p')})", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("target NLL of the true class on val (T = 1, log scale)")
        ax.set_ylabel("student test accuracy %")
    fig.suptitle("Does scoring the target on held-out labels predict the student? (mean over seeds; gate excluded)",
                 fontsize=10)
    fig.tight_layout()
    path = out_dir / "fmnist_scoring.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(stat: Mapping[str, float], scale: float = 100.0, digits: int = 2) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def table_markdown(report: Mapping[str, Any], regime: str) -> str:
    """Markdown table of one regime: accuracy and ECE (in %), MC-dropout ECE/NLL and val accuracy."""
    summary = report["summary"][regime]
    lines = ["| method | test acc % | test ECE % | test NLL | MC-dropout ECE % | MC-dropout NLL | val acc % | code |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in method_order(summary):
        s = summary[m]
        name = f"best single ({s['teacher']})" if m == "best_single" else m
        lines.append(f"| {name} | {_pm(s['test_acc'])} | {_pm(s['test_ece'])} | {_pm(s['test_nll'], 1, 3)} | "
                     f"{_pm(s['test_mc_ece'])} | {_pm(s['test_mc_nll'], 1, 3)} | {_pm(s['val_acc'])} | "
                     f"{', '.join(s.get('code', ['published']))} |")
    return "\n".join(lines)


def scoring_markdown(report: Mapping[str, Any], regime: str) -> str:
    """Each scored target's val NLL (mean over seeds) beside the student's test accuracy and NLL, then the
    Spearman correlations."""
    sc = report["scoring"][regime]
    lines = ["| method | target NLL on val | student test acc % | student test NLL |", "| --- | --- | --- | --- |"]
    for m, p in sorted(sc["points"].items(), key=lambda kv: kv[1]["target_nll"]):
        lines.append(f"| {m} | {p['target_nll']:.4f} | {100 * p['test_acc']:.2f} | {p['test_nll']:.4f} |")
    lines.append("")
    for key in ("spearman_operators", "spearman_operators_without_label_aware", "spearman_with_candidates",
                "spearman_with_single_teachers"):
        if key not in sc:
            continue
        r = sc[key]
        lines.append(f"- {key.removeprefix('spearman_').replace('_', ' ')} (n = {r['n']}): rho with test accuracy "
                     f"{r['test_acc']['rho']} (p = {r['test_acc']['p']}), with test NLL {r['test_nll']['rho']} "
                     f"(p = {r['test_nll']['p']})")
    return "\n".join(lines)


def auto_markdown(report: Mapping[str, Any], regime: str, top: int = 6) -> str:
    """What each auto run chose, and the first rows of its ranked table."""
    lines = []
    for key, rec in report["scoring"][regime]["auto"].items():
        ch = rec["chosen"]
        lines += [f"\n{key} (domains: {rec['domains']}, {rec['positions']} val images): chose "
                  f"`{ch['aggregate']}` {json.dumps(ch['aggregate_kwargs'])}\n",
                  "| operator | note | NLL | ECE % | acc % | auto |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rec["ranked"][:top]:
            lines.append(f"| {r['aggregate']} | {r['note']} | {r['nll']:.4f} | {100 * r['ece']:.2f} | "
                         f"{100 * r['accuracy']:.2f} | {r['auto']} |")
    return "\n".join(lines)


def gate_markdown(report: Mapping[str, Any], regime: str) -> str:
    """The learned gate per seed: share of each teacher and weight entropy, over the run and its last quarter."""
    lines = ["| seed | share (all steps) | share (last quarter) | per-sample entropy all / last (max) | "
             "entropy of mean share, last |", "| --- | --- | --- | --- | --- |"]
    for g in report["scoring"][regime]["gate"]:
        lines.append(f"| {g['seed']} | {g['all']['share']} | {g['late']['share']} | {g['all']['entropy']} / "
                     f"{g['late']['entropy']} ({g['max_entropy']}) | {g['late']['entropy_of_share']} |")
    return "\n".join(lines)


def print_tables(report: Mapping[str, Any]) -> None:
    """Print every regime's tables and the wall time."""
    for regime in report["summary"]:
        print(f"\n### {regime}\n\n{table_markdown(report, regime)}")
        if report.get("scoring"):
            print(f"\n{scoring_markdown(report, regime)}\n\n{gate_markdown(report, regime)}")
            print(auto_markdown(report, regime))
    print(f"\nseconds: {report['seconds']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="fmnist_results.json written by fmnist_experiment")
    ap.add_argument("--out-dir", type=Path, help="where the PNGs go (default: next to the JSON)")
    args = ap.parse_args()
    plot_results(args.results, args.out_dir or args.results.parent)
    print_tables(json.loads(args.results.read_text()))


if __name__ == "__main__":
    main()
