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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["method_order", "plot_results", "print_tables", "table_markdown"]

_COLOURS = {"baseline": "#9e9e9e", "single": "#90caf9", "best": "#1565c0", "operator": "#ef6c00"}


def method_order(summary: Mapping[str, Any]) -> list[str]:
    """Baselines, best single, operators, then the other single teachers."""
    operators = [m for m in summary if m not in ("no_kd", "no_kd_transfer", "best_single")
                 and not m.startswith("single:")]
    singles = [m for m in summary if m.startswith("single:")]
    return ["no_kd", "no_kd_transfer", "best_single", *operators, *singles]


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
    return paths


def _pm(stat: Mapping[str, float], scale: float = 100.0, digits: int = 2) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def table_markdown(report: Mapping[str, Any], regime: str) -> str:
    """Markdown table of one regime: accuracy and ECE (in %), MC-dropout ECE/NLL and val accuracy."""
    summary = report["summary"][regime]
    lines = ["| method | test acc % | test ECE % | test NLL | MC-dropout ECE % | MC-dropout NLL | val acc % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in method_order(summary):
        s = summary[m]
        name = f"best single ({s['teacher']})" if m == "best_single" else m
        lines.append(f"| {name} | {_pm(s['test_acc'])} | {_pm(s['test_ece'])} | {_pm(s['test_nll'], 1, 3)} | "
                     f"{_pm(s['test_mc_ece'])} | {_pm(s['test_mc_nll'], 1, 3)} | {_pm(s['val_acc'])} |")
    return "\n".join(lines)


def print_tables(report: Mapping[str, Any]) -> None:
    """Print every regime's table and the wall time."""
    for regime in report["summary"]:
        print(f"\n### {regime}\n\n{table_markdown(report, regime)}")
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
