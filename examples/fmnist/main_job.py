"""The main job: precompute -> train -> evaluate on real data, end to end, in minutes on 2 CPUs.

Embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist). Two real teachers of different
architectures (an MLP and a CNN) are trained on the teacher split; their soft labels are cached
once over the 30,000-image transfer set (the student may use only 1,000 hard labels) and over
the 10,000-image test set; a small student is distilled from the cache (entropy-weighted
aggregation, no teacher loaded) and compared with the same student trained on the 1,000 labels
alone. Prints a report and writes it to OUT/report.json.

Run: `bash tools/main_job.sh` (sets up .venv first) or `python -m examples.fmnist.main_job --out runs/main`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from examples.fmnist.data import fmnist_split, load_fmnist, transfer_split
from examples.fmnist.models import build_teacher, save_teacher
from examples.fmnist.train_teachers import fit, recipes
from mtkd_cache import RunConfig, inspect_cache, open_cache, prepare_arrays, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.evaluate import evaluate_teachers
from mtkd_train.recipe import DistillRecipe

TEACHERS = ("mlp", "cnn_small")
STUDENT = "examples.fmnist.models:build_student"


def _images(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28) in [0, 1]


def train_teachers(out: Path, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    times = {}
    for r in recipes("generalists", seed):
        if r.config.name not in TEACHERS:
            continue
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = build_teacher(r.config)
        fit(model, torch.from_numpy(_images(x)), torch.from_numpy(y), r.epochs, seed, 2e-3, 256)
        save_teacher(model.eval(), r.config, out / r.config.name)
        times[r.config.name] = time.perf_counter() - t0
    return times


def distil(out: Path, train_cache: Path, test_cache: Path, alpha: float, steps: int, seed: int) -> dict[str, Any]:
    cfg = TrainConfig(cache=str(train_cache), teachers=TEACHERS, student=STUDENT, out=str(out), aggregate="entropy",
                      loss="forward_kl", tail_mode="spread", alpha=alpha, temperature=2.0, batch_size=128,
                      max_steps=steps, lr=3e-3, warmup_steps=20, checkpoint_every=steps, eval_cache=str(test_cache),
                      seed=seed, mc_samples=8)
    recipe = DistillRecipe(cfg).setup()
    losses = recipe.train()
    recipe.save()
    return {"final_loss": losses[-1], **recipe.evaluate()["student"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/main_job"))
    ap.add_argument("--steps", type=int, default=600, help="student optimizer steps (batch 128)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    split = fmnist_split(y)
    tr = transfer_split(args.seed, 1000, y)
    teacher_times = train_teachers(args.out / "teachers", x[split.teacher_train], y[split.teacher_train], args.seed)
    timings["train_teachers"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    labels = np.full(len(tr.indices), -1, dtype=np.int64)
    labelled = np.isin(tr.indices, tr.labelled)
    labels[labelled] = y[tr.indices][labelled]
    train_cache, test_cache = args.out / "cache_transfer", args.out / "cache_test"
    prepare_arrays(train_cache, {"pixel_values": _images(x[tr.indices])}, labels=labels, chunk_samples=4096)
    prepare_arrays(test_cache, {"pixel_values": _images(xt)}, labels=yt, chunk_samples=4096)
    for name in TEACHERS:
        for cache in (train_cache, test_cache):
            run_teacher(cache, RunConfig(teacher=name, model="examples.fmnist.models:load_teacher",
                                         top_k=10, batch_size=512, features=(-1,), feature_dtype="int8"),
                        factory_kwargs={"path": str(args.out / "teachers" / name)}, progress=False)
    timings["precompute"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    kd = distil(args.out / "student_kd", train_cache, test_cache, alpha=0.9, steps=args.steps, seed=args.seed)
    timings["train_student_kd"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    ce = distil(args.out / "student_labels_only", train_cache, test_cache, alpha=0.0, steps=args.steps, seed=args.seed)
    timings["train_student_labels_only"] = time.perf_counter() - t3

    teachers = evaluate_teachers(open_cache(test_cache), TEACHERS)
    info = inspect_cache(train_cache)
    report: dict[str, Any] = {
        "data": "Fashion-MNIST: teachers trained on 25,000 images; transfer set 30,000 (1,000 labelled); test 10,000",
        "teachers_test": teachers, "teacher_train_seconds": teacher_times,
        "student_kd_test": kd, "student_labels_only_test": ce,
        "cache": {"transfer_bytes": sum(f.stat().st_size for f in train_cache.rglob("*") if f.is_file()),
                  "bytes_per_position": {n: t["bytes_per_position"] for n, t in info["teachers"].items()}},
        "seconds": {**timings, "total": time.perf_counter() - t0},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print("\n=== mtkd main job report (Fashion-MNIST test set, 10,000 images) ===")
    for n, r in teachers.items():
        print(f"teacher {n:<12} accuracy {r['accuracy']:.4f}  ECE {r['ece']:.4f}")
    print(f"student KD (2 teachers, entropy) accuracy {kd['accuracy']:.4f}  ECE {kd['ece']:.4f}  "
          f"MC-dropout predictive entropy {kd['mc']['predictive_entropy']:.3f}")
    print(f"student, alpha=0 (CE only)       accuracy {ce['accuracy']:.4f}  ECE {ce['ece']:.4f}  "
          "(same stream and steps: ~4 of 128 samples per batch carry a label)")
    print(f"cache (transfer set) {report['cache']['transfer_bytes'] / 1e6:.1f} MB; bytes/position "
          + ", ".join(f"{n} {b:.1f}" for n, b in report['cache']['bytes_per_position'].items()))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    print(f"report written to {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
