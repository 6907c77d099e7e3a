"""Offline equals online: the same student distilled from the cache and from resident teachers.

Both runs use the same recipe, data order, student init, aggregation (mean of the teachers),
loss and steps; the only difference is where the teacher distribution of each batch comes from:
- offline: the mtkd cache (top-k = all 10 classes, 8-bit log-probability codes);
- online: the teachers themselves, run on the batch at every step (full float32 softmax).
The quality ratio offline/online on the 10k test split measures what the cache loses.

Run: python -m benchmarks.quality.offline_online --out benchmarks/quality/_work/offline_online --seeds 0 1 2
(needs the generalist teachers: python -m examples.fmnist.train_teachers --regime generalists ...)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from examples.fmnist.data import load_fmnist, transfer_split
from examples.fmnist.models import load_teacher
from mtkd_cache import RunConfig, prepare_arrays, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.recipe import DistillRecipe

TEACHERS = ("mlp", "cnn_small")
FACTORY = "examples.fmnist.models:load_teacher"


class OnlineRecipe(DistillRecipe):
    """The same recipe, with every batch's targets replaced by the resident teachers' full softmax.

    Needs ``merge_in="step"``: with the loader merging, a batch arrives merged and without its raw targets.
    """

    teacher_dir: Path

    def _loader(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        with torch.random.fork_rng():  # building the modules must not shift the student's dropout RNG
            teachers = {n: load_teacher(str(self.teacher_dir / n)) for n in self.cfg.teachers}
        for batch in super()._loader():
            with torch.inference_mode():
                x = batch["pixel_values"]
                for n, model in teachers.items():
                    logp = torch.log_softmax(model(pixel_values=x).logits.float(), -1)  # (B, 10)
                    b, v = logp.shape
                    batch["targets"][n] = {
                        "indices": torch.arange(v).expand(b, 1, v).clone(),
                        "logp": logp.view(b, 1, v).clone(),
                        "tail": torch.zeros(b, 1),
                    }
            yield batch


def _images(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[:, None]


def build_caches(out: Path, teacher_dir: Path, seed: int) -> tuple[Path, Path]:
    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    tr = transfer_split(seed, 1000, y)
    labels = np.where(np.isin(tr.indices, tr.labelled), y[tr.indices], -1)
    train_cache, test_cache = out / f"cache_transfer_s{seed}", out / "cache_test"
    prepare_arrays(train_cache, {"pixel_values": _images(x[tr.indices])}, labels=labels)
    prepare_arrays(test_cache, {"pixel_values": _images(xt)}, labels=yt)
    for n in TEACHERS:
        for cache in (train_cache, test_cache):
            run_teacher(cache, RunConfig(teacher=n, model=FACTORY, top_k=10, batch_size=512),
                        factory_kwargs={"path": str(teacher_dir / n)}, progress=False)
    return train_cache, test_cache


def run(out: Path, teacher_dir: Path, seed: int, steps: int) -> dict[str, Any]:
    train_cache, test_cache = build_caches(out, teacher_dir, seed)
    results: dict[str, Any] = {}
    for mode, cls in (("offline", DistillRecipe), ("online", OnlineRecipe)):
        cfg = TrainConfig(cache=str(train_cache), teachers=TEACHERS, student="examples.fmnist.models:build_student",
                          out=str(out / f"{mode}_s{seed}"), aggregate="mean", loss="forward_kl", tail_mode="spread",
                          alpha=0.9, temperature=2.0, batch_size=128, max_steps=steps, lr=3e-3, warmup_steps=20,
                          checkpoint_every=steps, eval_cache=str(test_cache), seed=seed,
                          merge_in="step")  # OnlineRecipe rewrites the raw targets: the step must merge them
        if Path(cfg.out).exists():
            import shutil

            shutil.rmtree(cfg.out)
        recipe = cls(cfg)
        if isinstance(recipe, OnlineRecipe):
            recipe.teacher_dir = teacher_dir
        recipe.setup()
        t0 = time.perf_counter()
        losses = recipe.train()
        seconds = time.perf_counter() - t0
        res = recipe.evaluate()["student"]
        results[mode] = {"accuracy": res["accuracy"], "ece": res["ece"], "nll": res["nll"], "seconds": seconds,
                         "first_losses": losses[:5], "final_loss": losses[-1]}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description="offline (cache) vs online (resident teachers) distillation")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/quality/_work/offline_online"))
    ap.add_argument("--teachers", type=Path, default=Path("benchmarks/quality/_work/fmnist_generalists_s0"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/offline_online.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {s: run(args.out, args.teachers, s, args.steps) for s in args.seeds}
    ratio = [runs[s]["offline"]["accuracy"] / runs[s]["online"]["accuracy"] for s in args.seeds]
    summary = {
        mode: {k: (statistics.mean(runs[s][mode][k] for s in args.seeds),
                   statistics.pstdev(runs[s][mode][k] for s in args.seeds)) for k in ("accuracy", "ece", "nll", "seconds")}
        for mode in ("offline", "online")}
    summary["accuracy_ratio_offline_over_online"] = (statistics.mean(ratio), statistics.pstdev(ratio))
    summary["throughput_ratio_offline_over_online"] = statistics.mean(
        runs[s]["online"]["seconds"] / runs[s]["offline"]["seconds"] for s in args.seeds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": runs, "summary": summary, "steps": args.steps}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
