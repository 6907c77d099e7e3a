"""Train the Fashion-MNIST teachers for the student-quality experiments.

    python -m examples.fmnist.train_teachers --out benchmarks/quality/_work/fmnist_generalists_s0 \
        --regime generalists --seed 0

Regimes (data: the ``teacher_train`` part of `fmnist_data.fmnist_split`, 25,000 images):

- ``generalists``: each teacher architecture (``mlp``, ``cnn_small``, ``cnn_wide``, ``cnn_gap``) on
  all 10 classes.
- ``specialists``: four ``cnn_small`` teachers, each on the ``teacher_train`` images of its own class
  subset ({0,1,2,3}, {3,4,5,6}, {6,7,8,9}, {0,2,4,6,8}: overlapping, every class covered at least
  twice). Each still outputs 10 logits; unseen classes get the constant `UNSEEN_LOGIT`, see
  `fmnist_models`. The subset is stored as ``"classes"`` in the teacher's config.json.

Recipe: Adam (lr 2e-3, cosine decay to 0), batch 256, cross-entropy, a fixed number of epochs per
architecture (`EPOCHS`, chosen so one regime costs ~2-3 minutes on one CPU thread), no augmentation.
The last epoch's weights are kept; there is no early stopping, so ``val`` is only reported here.

Output: ``OUT/<teacher>/config.json + model.safetensors`` per teacher, then ``OUT/teachers.json``
(written last) with each teacher's val and test accuracy over all 10 classes and over its own classes
only (the two differ for specialists), epochs and training seconds. Load a teacher with
``examples.fmnist.models:load_teacher``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from examples.fmnist.data import SPLIT_SEED, fmnist_split, load_fmnist, pixel_values
from examples.fmnist.models import TeacherConfig, build_teacher, save_teacher

__all__ = ["EPOCHS", "SPECIALIST_CLASSES", "TeacherRecipe", "recipes", "train_teachers"]

REGIMES = ("generalists", "specialists")
REPORT_FILE = "teachers.json"
#: Epochs per architecture: one epoch over 25,000 images costs ~0.5 s (mlp), ~6 s (cnn_small),
#: ~8-11 s (cnn_gap) and ~15-17 s (cnn_wide) on one thread.
EPOCHS = {"mlp": 10, "cnn_small": 5, "cnn_gap": 5, "cnn_wide": 3}
SPECIALIST_ARCH = "cnn_small"
SPECIALIST_CLASSES = {
    "spec_0123": (0, 1, 2, 3),
    "spec_3456": (3, 4, 5, 6),
    "spec_6789": (6, 7, 8, 9),
    "spec_even": (0, 2, 4, 6, 8),
}
_EVAL_BATCH = 1024


@dataclass(frozen=True)
class TeacherRecipe:
    """One teacher to train: its config (architecture, classes) and epochs."""

    config: TeacherConfig
    epochs: int


def recipes(regime: str, seed: int, epochs: int | None = None) -> list[TeacherRecipe]:
    """The teachers of a regime.

    Args:
        regime: "generalists" or "specialists".
        seed: recorded in each config's provenance.
        epochs: overrides `EPOCHS` for every teacher when given.

    Raises:
        ValueError: unknown regime.
    """
    provenance = {
        "dataset": "fashion-mnist",
        "trained_on": "teacher_train",
        "split_seed": SPLIT_SEED,
        "seed": seed,
        "regime": regime,
    }
    if regime == "generalists":
        named = [(arch, arch, tuple(range(10))) for arch in EPOCHS]
    elif regime == "specialists":
        named = [(name, SPECIALIST_ARCH, classes) for name, classes in SPECIALIST_CLASSES.items()]
    else:
        raise ValueError(f"regime={regime!r}: expected one of {REGIMES}")
    return [
        TeacherRecipe(
            TeacherConfig(name=name, arch=arch, classes=classes, provenance=provenance),
            epochs if epochs is not None else EPOCHS[arch],
        )
        for name, arch, classes in named
    ]


def fit(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, lr: float, batch_size: int
) -> float:
    """Train `model` in place with Adam + cosine decay; return the last epoch's mean loss.

    Args:
        x: (N, 1, 28, 28) float in [0, 1].
        y: (N,) int64 labels.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]).logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        epoch_loss = total / len(y)
    return epoch_loss


@torch.no_grad()
def accuracies(
    model: nn.Module, x: Tensor, y: Tensor, classes: tuple[int, ...]
) -> dict[str, float]:
    """Accuracy over all rows, and over the rows whose label is in `classes`.

    Args:
        x: (N, 1, 28, 28) float in [0, 1].
        y: (N,) int64 labels.
    """
    model.eval()
    preds = torch.cat(
        [model(x[i : i + _EVAL_BATCH]).logits.argmax(-1) for i in range(0, len(y), _EVAL_BATCH)]
    )
    correct = preds == y
    own = torch.isin(y, torch.tensor(classes))
    return {"all": correct.float().mean().item(), "own_classes": correct[own].float().mean().item()}


def train_teachers(
    out: Path,
    regime: str,
    seed: int,
    epochs: int | None = None,
    lr: float = 2e-3,
    batch_size: int = 256,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and save a regime's teachers; write and return the report.

    Raises:
        FileExistsError: `out` already holds a report or one of these teachers, and not `overwrite`.
    """
    plan = recipes(regime, seed, epochs)
    existing = [p for p in [out / REPORT_FILE, *(out / r.config.name for r in plan)] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(p.name for p in existing)}; pass --overwrite to replace them"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    images, labels = load_fmnist("train")
    split = fmnist_split(labels)
    test_images, test_labels = load_fmnist("test")
    x_val, y_val = pixel_values(images[split.val]), torch.from_numpy(labels[split.val])
    x_test, y_test = pixel_values(test_images), torch.from_numpy(test_labels)

    report: dict[str, Any] = {
        "dataset": "fashion-mnist",
        "regime": regime,
        "seed": seed,
        "split_seed": SPLIT_SEED,
        "split_sizes": split.sizes(),
        "recipe": {"optimizer": "adam", "lr": lr, "schedule": "cosine", "batch_size": batch_size},
        "factory": "examples.fmnist.models:load_teacher",
        "teachers": [],
    }
    start_all = time.perf_counter()
    for i, recipe in enumerate(plan):
        config = recipe.config
        rows = split.teacher_train[np.isin(labels[split.teacher_train], config.classes)]
        x, y = pixel_values(images[rows]), torch.from_numpy(labels[rows])
        torch.manual_seed(seed * 1000 + i)  # init and dropout
        model = build_teacher(config)
        start = time.perf_counter()
        loss = fit(model, x, y, recipe.epochs, seed * 1000 + i, lr, batch_size)
        seconds = time.perf_counter() - start
        val = accuracies(model, x_val, y_val, config.classes)
        test = accuracies(model, x_test, y_test, config.classes)
        save_teacher(model, config, out / config.name)
        entry = {
            "name": config.name,
            "arch": config.arch,
            "classes": list(config.classes),
            "epochs": recipe.epochs,
            "n_train": len(rows),
            "final_train_loss": round(loss, 4),
            "train_seconds": round(seconds, 1),
            "val_acc": round(val["all"], 4),
            "test_acc": round(test["all"], 4),
            "val_acc_own_classes": round(val["own_classes"], 4),
            "test_acc_own_classes": round(test["own_classes"], 4),
        }
        report["teachers"].append(entry)
        click.echo(
            f"{config.name:>10}: val {entry['val_acc']:.4f} test {entry['test_acc']:.4f} "
            f"(own classes: val {entry['val_acc_own_classes']:.4f} test "
            f"{entry['test_acc_own_classes']:.4f}) in {seconds:.0f}s",
            err=True,
        )
    report["total_train_seconds"] = round(sum(t["train_seconds"] for t in report["teachers"]), 1)
    report["total_wall_seconds"] = round(time.perf_counter() - start_all, 1)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write <teacher>/config.json + model.safetensors and teachers.json into.",
)
@click.option(
    "--regime", required=True, type=click.Choice(REGIMES), help="Which teachers to train."
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seeds initialisation and batch order."
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Epochs for every teacher (default: per architecture).",
)
@click.option(
    "--lr",
    default=2e-3,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Adam peak learning rate.",
)
@click.option(
    "--batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training batch size.",
)
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch CPU threads."
)
@click.option("--overwrite", is_flag=True, help="Replace a report or teachers already in --out.")
def main(
    out: Path,
    regime: str,
    seed: int,
    epochs: int | None,
    lr: float,
    batch_size: int,
    threads: int,
    overwrite: bool,
) -> None:
    """Train the Fashion-MNIST teachers of one regime and report their val/test accuracy."""
    torch.set_num_threads(threads)
    try:
        report = train_teachers(out, regime, seed, epochs, lr, batch_size, overwrite)
    except (FileExistsError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"{len(report['teachers'])} teachers in {report['total_train_seconds']}s -> {out / REPORT_FILE}"
    )


if __name__ == "__main__":
    main()
