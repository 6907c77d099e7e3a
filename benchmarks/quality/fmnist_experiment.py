"""Multi-teacher KD on Fashion-MNIST: every aggregation operator against no-KD and the best single teacher.

    python -m benchmarks.quality.fmnist_experiment --out benchmarks/quality/_work/fmnist_exp --seeds 0 1 2

Setting (transfer set, see `fmnist_data`): the seed-0 teachers of each regime (`train_teachers`; trained
here if missing) were fit on ``teacher_train``; the student (784-128-10 MLP) sees every teacher's soft
labels on the 30,000-image transfer set and hard labels for 1,000 of them (`transfer_split(seed, 1000)`).
Model selection uses ``val`` (5,000); final numbers are on the 10,000-image test split only.

Methods, per regime (generalists: 4 architectures on all classes; specialists: 4 class-subset teachers):

- ``no_kd``: cross-entropy on the 1,000 labels alone, from a cache that holds only those 1,000 images, so
  300 steps are ~38 epochs of them (val accuracy is flat from ~150 to 600 steps; regime-independent:
  reported in both tables).
- ``no_kd_transfer``: alpha = 0 on the transfer cache with the KD schedule: 1,000 labels, ~4 per batch,
  ~1.3 passes over them. A control showing how an under-trained baseline inflates KD gains.
- ``single:<teacher>``: KD from one teacher; ``best_single`` is the one with the best mean val accuracy.
- one run per operator over all 4 teachers: mean, loglinear, entropy, confidence, label_aware, gate,
  routing, mtbkd (prior strength `MTBKD_PRIOR`). Operator options are the library defaults. The gate is
  trained on its own proper scoring rule (NLL of the true class on the labelled rows; `fmnist_auto.gate_stats`
  reports its weights and entropy).
- ``auto`` / ``auto_global``: the operator and options `mtkd_train.scoring` (``mtkd-score``, ``--aggregate
  auto``) chooses on the val cache before training: ``auto`` with the seed's router domains on val (so
  per-domain routing is a candidate), ``auto_global`` without domains. The experiment's eval cache is the
  test split, so the choice is made on val explicitly (`fmnist_auto.choose_auto`), not by ``auto`` inside
  the trainer, which would score on the eval cache.
- ``cand:<operator>:<note>`` (only with ``--methods candidates``): every fitted row of the ``auto_global``
  table (EM weights, fitted tau) trained as a student, for the Spearman correlation of target NLL and student.

Every KD run: loss 0.9 forward-KL (T = 2, teachers tempered before mixing, exact top-10 targets,
u8log values) + 0.1 CE on the labelled samples of the batch, AdamW lr 3e-3, batch 128, `--steps` steps
(300 = 1.28 epochs of the transfer set), no early stopping. Test metrics are also computed with
`MC_SAMPLES` MC-dropout passes.

Router (``routing``): a per-sample domain must exist for every transfer image without using its label.
The domain of a labelled image is its class; that of an unlabelled image is the class predicted by the
seed's ``no_kd`` student (trained on the 1,000 labels only, so no teacher and no hidden label is used).
Specialists: domain c -> uniform weights over the specialists trained on class c. Generalists: domain
c -> the teacher with the best ``val`` recall on class c.

Caches (under OUT/caches): ``test`` and ``val`` with all 8 teachers (once); per seed ``labelled_s<seed>``
(1,000 images; teacher ``mlp`` only, which alpha = 0 never uses) and ``transfer_s<seed>`` with all 8
teachers. The labelled subset and the domains are part of a cache's inputs (labels enter the content
fingerprint), so each seed needs its own transfer cache and the teachers run on it once per seed.
Student runs only read caches; none loads a teacher. A finished run leaves OUT/runs/s<seed>/<regime>/<method>/
result.json and is skipped when the command is repeated (resumable per regime, method and seed);
``--methods`` trains only some methods now. The results JSON always covers every finished run.

Output: ``benchmarks/results/fmnist_results.json`` (every run with the git revision it ran from, summaries,
teachers, router accuracy, the ``scoring`` section: auto tables, gate statistics, each target's val NLL and
its Spearman correlation with the students; wall time) and the plots of `plot_fmnist`.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.quality.fmnist_auto import choose_auto, gate_stats, heldout, scoring_report
from benchmarks.quality.fmnist_routes import routing_options
from examples.fmnist.data import fmnist_split, load_fmnist, pixel_values, transfer_split
from examples.fmnist.train_teachers import REPORT_FILE, train_teachers
from mtkd_cache import RunConfig, open_cache, prepare_arrays, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.evaluate import evaluate_student, evaluate_teachers
from mtkd_train.recipe import DistillRecipe

__all__ = ["OPERATORS", "TEACHERS", "StudentRecipe", "main", "run_experiment"]

TEACHERS = {
    "generalists": ("mlp", "cnn_small", "cnn_wide", "cnn_gap"),
    "specialists": ("spec_0123", "spec_3456", "spec_6789", "spec_even"),
}
OPERATORS = ("mean", "loglinear", "entropy", "confidence", "label_aware", "gate", "routing", "mtbkd")
#: chosen from the cache before training: `auto` scores on val with the router's domains (so per-domain
#: routing is a candidate), `auto_global` without domains (what `mtkd-score` on the val cache chooses)
AUTO = ("auto", "auto_global")
#: ``--methods candidates``: also train every fitted candidate of the auto_global table (EM weights, fitted
#: tau), so the Spearman correlation covers more configurations than the library defaults
CANDIDATE_NOTES = ("EM weights", "tau fitted")
MTBKD_PRIOR = 0.1
MC_SAMPLES = 8
NUM_CLASSES = 10
LOADER = "examples.fmnist.models:load_teacher"
STUDENT = "examples.fmnist.models:build_student"
RESULTS_FILE = "fmnist_results.json"


@dataclass(frozen=True)
class StudentRecipe:
    """Optimisation settings shared by every student run."""

    steps: int = 300
    """Optimizer steps (batch 128): 1.28 epochs of the transfer set."""
    alpha: float = 0.9
    """KD weight for KD runs; no-KD runs use 0."""
    temperature: float = 2.0
    """KD temperature (teachers are tempered before mixing)."""
    lr: float = 3e-3
    """AdamW peak learning rate (20 warm-up steps, cosine to 0.1x)."""
    batch_size: int = 128
    """Samples per step."""


@dataclass(frozen=True)
class Run:
    """One student run: where it trains, from which teachers, how targets are merged."""

    regime: str
    method: str
    seed: int
    cache: Path
    teachers: tuple[str, ...]
    alpha: float
    aggregate: str = "mean"
    aggregate_kwargs: Mapping[str, Any] = field(default_factory=dict)


def _teacher_dirs(root: Path) -> dict[str, Path]:
    """Every teacher's folder, training a regime's seed-0 teachers first if they are missing."""
    dirs = {}
    for regime, names in TEACHERS.items():
        folder = root / f"fmnist_{regime}_s0"
        if not (folder / REPORT_FILE).is_file():
            print(f"training the {regime} teachers into {folder}", flush=True)
            train_teachers(folder, regime, seed=0, overwrite=True)
        dirs.update({name: folder / name for name in names})
    return dirs


def _cache(path: Path, images: np.ndarray, labels: np.ndarray, teachers: Mapping[str, Path],
           domains: Sequence[str] | None = None) -> Path:
    """Prepare `path` with these inputs (unless already there) and run each teacher on it once."""
    prepare_arrays(path, {"pixel_values": pixel_values(images).numpy()}, labels=labels, domains=domains,
                   chunk_samples=4096)
    stored = open_cache(path).samples.column("domain").to_pylist() if domains is not None else None
    if domains is not None and stored != list(domains):
        # The inputs fingerprint does not cover domain values: a cache with other domains is
        # returned as is. Rebuild it (and its teachers) rather than train on stale routes.
        prepare_arrays(path, {"pixel_values": pixel_values(images).numpy()}, labels=labels, domains=domains,
                       chunk_samples=4096, overwrite=True)
    for name, folder in teachers.items():
        run_teacher(path, RunConfig(teacher=name, model=LOADER, top_k=10, batch_size=512),
                    factory_kwargs={"path": str(folder)}, progress=False)
    return path


def _teacher_weights(metrics: Path) -> list[float] | None:
    """Mean over steps of the per-batch mean teacher (or gate) weights logged by the recipe."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    ws = [r.get("teacher_weights", r.get("gate_weights")) for r in rows if "step" in r and "eval" not in r]
    ws = [w for w in ws if w is not None]
    return np.mean(ws, axis=0).round(4).tolist() if ws else None


@functools.cache
def code_revision() -> str:
    """The git commit the process started from, ``+dirty`` if its code (not its results) had uncommitted
    changes: the library, the examples and this experiment's modules."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parents[2]).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "mtkd_cache", "mtkd_train", "examples",
                                       "benchmarks/quality") else "")


def train_student(run: Run, out: Path, test_cache: Path, val_cache: Path,
                  recipe: StudentRecipe) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train one student from `run.cache`, evaluate on val and test; return its record and module."""
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(
        cache=str(run.cache), teachers=run.teachers, student=STUDENT, out=str(out), aggregate=run.aggregate,
        aggregate_kwargs=dict(run.aggregate_kwargs), loss="forward_kl", tail_mode="spread", alpha=run.alpha,
        temperature=recipe.temperature, batch_size=recipe.batch_size, max_steps=recipe.steps, lr=recipe.lr,
        warmup_steps=20, checkpoint_every=recipe.steps + 1, log_every=5, eval_cache=str(test_cache),
        seed=run.seed, mc_samples=MC_SAMPLES)
    start = time.perf_counter()
    distill = DistillRecipe(cfg).setup()
    losses = distill.train()
    train_seconds = time.perf_counter() - start
    test = distill.evaluate()["student"]
    val = evaluate_student(distill.student, open_cache(val_cache), batch_size=1024, vocab_size=NUM_CLASSES)
    record = {
        "regime": run.regime, "method": run.method, "seed": run.seed, "teachers": list(run.teachers),
        "aggregate": run.aggregate if run.alpha > 0 else None, "alpha": run.alpha, "steps": recipe.steps,
        "test_acc": test["accuracy"], "test_ece": test["ece"], "test_nll": test["nll"],
        "test_mc_acc": test["mc"]["accuracy"], "test_mc_ece": test["mc"]["ece"], "test_mc_nll": test["mc"]["nll"],
        "test_mc_mutual_information": test["mc"]["mutual_information"],
        "val_acc": val["accuracy"], "val_ece": val["ece"], "final_loss": losses[-1],
        "aggregate_kwargs": dict(run.aggregate_kwargs) if run.alpha > 0 else None,
        "teacher_weights": _teacher_weights(out / "metrics.jsonl") if run.alpha > 0 else None,
        "gate": gate_stats(out / "metrics.jsonl", len(run.teachers)) if run.aggregate == "gate" and run.alpha > 0
        else None,
        "code": code_revision(),
        "train_seconds": round(train_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record, distill.student.module


def _predict(student: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The student's argmax class per image (N,)."""
    student.eval()
    with torch.no_grad():
        return torch.cat([student(pixel_values(images[i : i + 4096])).logits.argmax(-1)
                          for i in range(0, len(images), 4096)]).numpy()


@dataclass(frozen=True)
class _Data:
    """The images and labels of every split the experiment touches."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    val: np.ndarray


def _router(seed_dir: Path, no_kd: Run, data: _Data, caches: tuple[Path, Path], recipe: StudentRecipe,
            transfer: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The no-KD run, then its predicted class per transfer image (labelled ones keep their label) and per
    val image; trained once, then read back from ``router_domains.npy`` / ``router_val.npy``."""
    files = seed_dir / "router_domains.npy", seed_dir / "router_val.npy", seed_dir / "no_kd" / "result.json"
    if not all(f.is_file() for f in files):
        _, student = train_student(no_kd, seed_dir / "no_kd", *caches, recipe)
        indices, labels = transfer
        np.save(files[0], np.where(labels >= 0, labels, _predict(student, data.x[indices])))
        np.save(files[1], _predict(student, data.x[data.val]))
    return np.load(files[0]), np.load(files[1])


def _auto_runs(regime: str, seed: int, transfer: Path, val_cache: Path, val_classes: np.ndarray,
               seed_dir: Path, recipe: StudentRecipe, only: frozenset[str] | None) -> list[Run]:
    """The `auto` and `auto_global` runs, their operator chosen on val (the choice is written once)."""
    runs = []
    for method in AUTO:
        if only is not None and method not in only and not (method == "auto_global" and "candidates" in only):
            continue
        choice = seed_dir / regime / f"{method}_choice.json"
        if not choice.is_file():
            classes = val_classes if method == "auto" else None
            choose_auto(heldout(val_cache, TEACHERS[regime], classes), choice)
        record = json.loads(choice.read_text())
        chosen = record["chosen"]
        runs.append(Run(regime, method, seed, transfer, TEACHERS[regime], recipe.alpha, chosen["aggregate"],
                        chosen["aggregate_kwargs"]))
        if method == "auto_global" and only is not None and "candidates" in only:
            runs += [Run(regime, f"cand:{r['aggregate']}:{r['note'].replace(' ', '_').replace(',', '')}", seed,
                         transfer, TEACHERS[regime], recipe.alpha, r["aggregate"], r["aggregate_kwargs"])
                     for r in record["ranked"] if r["auto"] and r["note"].startswith(CANDIDATE_NOTES)]
    return runs


def _selected(method: str, only: frozenset[str] | None) -> bool:
    return only is None or method in only or (method.startswith("single:") and "single" in only) or (
        method.startswith("cand:") and "candidates" in only)


def _seed_runs(seed: int, data: _Data, out: Path, dirs: Mapping[str, Path], caches: tuple[Path, Path],
               recipe: StudentRecipe, n_labelled: int, only: frozenset[str] | None) -> dict[str, Any]:
    """The runs of one seed that `only` selects (no-KD always: its student routes the transfer cache)."""
    split = transfer_split(seed, n_labelled, data.y)
    start = time.perf_counter()
    seed_dir = out / "runs" / f"s{seed}"
    labelled = _cache(out / "caches" / f"labelled_s{seed}", data.x[split.labelled], data.y[split.labelled],
                      {"mlp": dirs["mlp"]})
    labels = np.where(np.isin(split.indices, split.labelled), data.y[split.indices], -1)
    no_kd = Run("shared", "no_kd", seed, labelled, ("mlp",), alpha=0.0)
    classes, val_classes = _router(seed_dir, no_kd, data, caches, recipe, (split.indices, labels))
    domains = [f"class{c}" for c in classes]
    transfer = _cache(out / "caches" / f"transfer_s{seed}", data.x[split.indices], labels, dirs, domains)
    hits = (classes == data.y[split.indices])[labels < 0]  # for the report only; never trained on
    router: dict[str, Any] = {"seed": seed, "unlabelled_accuracy": float(hits.mean()),
                              "val_accuracy": float((val_classes == data.y[data.val]).mean()),
                              "caches_and_no_kd_seconds": round(time.perf_counter() - start, 1)}
    runs = [Run("shared", "no_kd_transfer", seed, transfer, ("mlp",), alpha=0.0)]
    for regime, names in TEACHERS.items():
        runs += [Run(regime, f"single:{t}", seed, transfer, (t,), recipe.alpha) for t in names]
        for op in OPERATORS:
            kwargs: dict[str, Any] = {}
            if op == "routing":
                kwargs = routing_options(regime, names, dirs, caches[1], domains)
                router[f"{regime}_routes"] = kwargs
            elif op == "mtbkd":
                kwargs = {"prior_strength": MTBKD_PRIOR}
            runs.append(Run(regime, op, seed, transfer, names, recipe.alpha, op, kwargs))
        runs += _auto_runs(regime, seed, transfer, caches[1], val_classes, seed_dir, recipe, only)
    for run in runs:
        run_dir = seed_dir / run.regime / run.method.replace(":", "_")
        if not _selected(run.method, only) or (run_dir / "result.json").is_file():
            continue
        rec, _ = train_student(run, run_dir, *caches, recipe)
        print(f"seed {seed} {run.regime:<11} {run.method:<18} test acc {rec['test_acc']:.4f} "
              f"ECE {rec['test_ece']:.4f} val {rec['val_acc']:.4f} ({rec['seconds']:.0f}s)", flush=True)
    return router


def read_records(out: Path, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every finished run of these seeds under ``OUT/runs`` (this invocation's and earlier ones)."""
    return [json.loads(f.read_text()) for seed in seeds
            for f in sorted((out / "runs" / f"s{seed}").rglob("result.json"))]


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per regime and method: mean and std over seeds; ``best_single`` picked by mean val accuracy."""
    keys = ("test_acc", "test_ece", "test_nll", "test_mc_acc", "test_mc_ece", "test_mc_nll", "val_acc")
    out: dict[str, dict[str, Any]] = {}
    for regime in TEACHERS:
        rows = [r for r in records if r["regime"] in (regime, "shared")]
        table: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["method"] == method]
            entry: dict[str, Any] = {k: _stats([r[k] for r in group]) for k in keys}
            entry["seeds"] = sorted(r["seed"] for r in group)
            entry["code"] = sorted({r.get("code", "published") for r in group})
            table[method] = entry
        singles = [m for m in table if m.startswith("single:")]
        if singles:
            best = max(singles, key=lambda m: table[m]["val_acc"]["mean"])
            table["best_single"] = {**table[best], "teacher": best.removeprefix("single:")}
        out[regime] = table
    return out


def run_experiment(out: Path, seeds: Sequence[int], teachers_root: Path, results: Path,
                   recipe: StudentRecipe, n_labelled: int = 1000, only: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """Build the caches, train the students `only` selects (default: all) that have no result yet, then
    write the results JSON and plots of every finished run; return the report."""
    select = frozenset(only) if only else None
    start = time.perf_counter()
    dirs = _teacher_dirs(teachers_root)
    x, y = load_fmnist("train")
    x_test, y_test = load_fmnist("test")
    data = _Data(x, y, x_test, y_test, fmnist_split(y).val)
    test_cache = _cache(out / "caches" / "test", x_test, y_test, dirs)
    val_cache = _cache(out / "caches" / "val", x[data.val], y[data.val], dirs)
    precompute = time.perf_counter() - start
    routers = [_seed_runs(seed, data, out, dirs, (test_cache, val_cache), recipe, n_labelled, select)
               for seed in seeds]
    records = read_records(out, seeds)
    summary = summarise(records)
    report = {
        "command": "python -m benchmarks.quality.fmnist_experiment --out "
                   f"{out} --seeds {' '.join(map(str, seeds))}",
        "setting": {"n_labelled": n_labelled, "transfer": 30_000, "val": 5_000, "test": 10_000,
                    "teacher_seed": 0, "seeds": list(seeds), "student": "784-128-10 MLP, dropout 0.2",
                    "recipe": asdict(recipe), "mtbkd_prior_strength": MTBKD_PRIOR,
                    "mc_samples": MC_SAMPLES, "top_k": 10, "values": "u8log"},
        "teachers_test": evaluate_teachers(open_cache(test_cache), list(dirs)),
        "teachers_val": evaluate_teachers(open_cache(val_cache), list(dirs)),
        "router": routers,
        "summary": summary,
        "scoring": scoring_report(out, val_cache, seeds, records, summary, TEACHERS),
        "runs": records,
        "seconds": {"first_caches": round(precompute, 1), "total": round(time.perf_counter() - start, 1),
                    "student_runs": round(sum(r["seconds"] for r in records), 1)},
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / RESULTS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    from benchmarks.quality.plot_fmnist import plot_results, print_tables

    plot_results(results / RESULTS_FILE, results)
    print_tables(report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/quality/_work/fmnist_exp"),
                    help="work folder: caches and per-run folders (finished runs are reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="student seeds: labelled subset, init, data order")
    ap.add_argument("--teachers-root", type=Path, default=Path("benchmarks/quality/_work"),
                    help="holds fmnist_<regime>_s0/ teacher folders (trained when missing)")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                    help="where fmnist_results.json and the plots go")
    ap.add_argument("--steps", type=int, default=StudentRecipe.steps, help="optimizer steps per student")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="train only these methods now (no_kd always runs first: it is the router): no_kd_transfer, "
                         f"single (every single teacher), {', '.join(OPERATORS + AUTO)}, candidates (each fitted "
                         "row of the auto_global table; only when named); the results JSON and plots cover every "
                         "finished run")
    args = ap.parse_args(argv)
    known = {"no_kd", "no_kd_transfer", "single", "candidates", *OPERATORS, *AUTO}
    if args.methods and not set(args.methods) <= known:
        ap.error(f"--methods {sorted(set(args.methods) - known)} unknown; choose from {sorted(known)}")
    if args.steps < 1 or not args.seeds:
        ap.error("--steps must be >= 1 and --seeds non-empty")
    torch.set_num_threads(args.threads)
    run_experiment(args.out, args.seeds, args.teachers_root, args.results, StudentRecipe(steps=args.steps),
                   only=args.methods)


if __name__ == "__main__":
    main()
